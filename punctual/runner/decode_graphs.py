"""Decode steps replayed from CUDA graphs, one graph per (batch, context) bucket.

On a GPU a small model's decode step is launch-bound: a few hundred kernels of microseconds each,
every one queued by Python. A CUDA graph records them once and replays them in one call. A graph
fixes every shape and every address, so each captured step has static input buffers (token ids,
positions, KV slots, block tables, context lengths) and a static logits output, and a step is
padded up to its bucket:

- the batch to the next captured size (1, 2, 4, 8, 16, 24, 32, ...; vLLM's ladder): padded rows
  take token 0 at position 0 with a context of one key, and write their K/V to the runner's
  scratch block, a block no request is ever given;
- the context to the next power-of-two number of blocks: each sequence's keys are gathered through
  a block table padded with block 0 and masked by its length, so attention reads what is there.

Every graph is captured when the runner starts, never in the middle of traffic. A pair whose
gathered K/V would pass MAX_GATHER_BYTES a layer is not captured, and such steps (and every
step with a prompt chunk, a speculated token or prompt logprobs) run eagerly as before.

The same static step runs without capture (`capture=False`) on any device: that is how the CPU
tests check the padding, the buckets and the scratch block against eager decoding; only the
recording is CUDA's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Gathered K and V of one layer for the largest captured step, in bytes: bounds the graphs' memory
# pool (the gather is the step's largest intermediate) and so which (batch, context) pairs exist.
MAX_GATHER_BYTES = 1 << 30


def capture_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (and max_batch itself): a step pads at most 7 rows
    past 8, and at most doubles below it."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch])) if max_batch >= 1 else []


def capture_context_blocks(max_model_len: int, block_size: int, min_tokens: int = 256) -> list[int]:
    """Block counts of the context buckets: powers of two from `min_tokens` worth of blocks up to
    the blocks of max_model_len (the last bucket), so a step gathers at most twice its context."""
    last = -(-max_model_len // block_size)
    counts, blocks = [], max(1, -(-min_tokens // block_size))
    while blocks < last:
        counts.append(blocks)
        blocks *= 2
    return counts + [last]


@dataclass
class _CapturedStep:
    """One bucket's static buffers: the graph reads its inputs from, and writes its logits to, these
    same tensors on every replay."""

    batch: int
    blocks: int
    input_ids: torch.Tensor  # [batch] long
    positions: torch.Tensor  # [batch] long
    slots: torch.Tensor  # [batch] long
    block_tables: torch.Tensor  # [batch, blocks] long
    context_lens: torch.Tensor  # [batch] long
    logits: torch.Tensor | None = None  # [batch, vocab] float32, the graph's output
    graph: "torch.cuda.CUDAGraph | None" = None


class DecodeGraphs:
    """Captured decode steps for a model and its KV caches. `run` takes one step of n single-token
    queries and returns their logits [n, vocab], or None when no bucket holds the step."""

    def __init__(self, model, kv_caches, block_size: int, scratch_block: int, max_batch: int,
                 max_model_len: int, capture: bool = True):
        if getattr(model, "kernels", None) is not None:
            raise ValueError("decode graphs replay the PyTorch ops; the fused CPU kernels already run a step in one call")
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {model.device.type}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.capture = capture
        self.device = model.device
        self.replays = 0  # steps served from a bucket (tests and the start-up log read it)
        cache = kv_caches[0]
        bytes_per_token = 2 * cache.k.shape[2] * cache.k.shape[3] * model.dtype.itemsize
        self.batch_sizes = capture_batch_sizes(max_batch)
        self.context_blocks = capture_context_blocks(max_model_len, block_size)
        self.steps: dict[tuple[int, int], _CapturedStep] = {}
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if capture else None
        # Largest first, so the smaller graphs' intermediates fit in memory the pool already holds.
        for batch in reversed(self.batch_sizes):
            for blocks in reversed(self.context_blocks):
                if batch * blocks * block_size * bytes_per_token > MAX_GATHER_BYTES:
                    continue
                self.steps[batch, blocks] = self._build(batch, blocks, pool)
        self.startup_s = time.perf_counter() - start
        if capture:
            logger.info("captured %d decode graphs (batch up to %d, context up to %d tokens) in %.1f s",
                        len(self.steps), max_batch, self.context_blocks[-1] * block_size, self.startup_s)

    def _build(self, batch: int, blocks: int, pool) -> _CapturedStep:
        dev = self.device
        step = _CapturedStep(batch, blocks, torch.zeros(batch, dtype=torch.long, device=dev),
                             torch.zeros(batch, dtype=torch.long, device=dev),
                             torch.full((batch,), self.scratch_slot, dtype=torch.long, device=dev),
                             torch.zeros(batch, blocks, dtype=torch.long, device=dev),
                             torch.ones(batch, dtype=torch.long, device=dev))
        if not self.capture:
            return step
        # Warm-up on a side stream (cuBLAS and the allocator set themselves up outside the capture);
        # every row is padding, so these runs write only to the scratch block.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(step)
        torch.cuda.current_stream(dev).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=pool):
            step.logits = self._forward(step)
        return step

    @torch.inference_mode()
    def _forward(self, step: _CapturedStep) -> torch.Tensor:
        return self.model.decode_logits(step.input_ids, step.positions, step.slots, step.block_tables,
                                        step.context_lens, self.kv_caches)

    def bucket(self, batch: int, max_context: int) -> _CapturedStep | None:
        """The smallest captured step that holds `batch` queries reaching `max_context` keys."""
        blocks_needed = -(-max_context // self.block_size)
        for b in self.batch_sizes:
            if b < batch:
                continue
            for blocks in self.context_blocks:
                if blocks >= blocks_needed and (b, blocks) in self.steps:
                    return self.steps[b, blocks]
            return None  # the budget left out every context this long at this batch, and at larger ones
        return None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            tables: list[torch.Tensor], max_context: int) -> torch.Tensor | None:
        """One decode step ([n] long tensors, the runner's flat inputs): token i at positions[i]
        writes its K/V at slots[i] and attends over its first positions[i] + 1 keys through
        tables[i] (its block ids); `max_context` is the largest of those counts. Returns logits
        [n, vocab], a view of the bucket's output that the next run overwrites; None when no bucket
        holds the step."""
        n = input_ids.shape[0]
        step = self.bucket(n, max_context)
        if step is None:
            return None
        step.input_ids[:n].copy_(input_ids, non_blocking=True)
        step.positions[:n].copy_(positions, non_blocking=True)
        step.slots[:n].copy_(slots, non_blocking=True)
        torch.add(positions, 1, out=step.context_lens[:n])
        padded = torch.nn.utils.rnn.pad_sequence([t[:step.blocks] for t in tables], batch_first=True)
        step.block_tables[:n, :padded.shape[1]].copy_(padded, non_blocking=True)
        step.block_tables[:n, padded.shape[1]:] = 0
        if n < step.batch:  # rows left by a larger step of the same bucket: back to padding
            step.input_ids[n:] = 0
            step.positions[n:] = 0
            step.slots[n:] = self.scratch_slot
            step.context_lens[n:] = 1
            step.block_tables[n:] = 0
        if step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._forward(step)
        self.replays += 1
        return step.logits[:n]
