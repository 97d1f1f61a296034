"""The model runner: owns the weights and KV tensors, turns a step plan into tensors, logits, tokens."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch

from punctual.checkpoints import weight_stream
from punctual.checkpoints.loader import load_shard, load_weights, resolve_model_path
from punctual.config import CacheConfig, LoRAConfig, ModelConfig
from punctual.kernels.cpu_kernels import int8_kv_attention_supported
from punctual.lora.cache import AdapterCache
from punctual.lora.request import LoRARequest
from punctual.lora.weights import LoRAAdapter, LoRAStep, load_adapter
from punctual.models.attention import (MAX_DECODE_BUCKETS, MAX_SHORT_QUERY, AttentionMetadata, DecodeBucket,
                                      LayerKVCache, SparseDecode, decode_mask)
from punctual.models.collectives import RankGroup
from punctual.models.config import ModelArchConfig
from punctual.models.decoder import DecoderModel, KernelChoices
from punctual.models.kv_shift import KeyShifter
from punctual.models.registry import architecture, load_arch_config
from punctual.models.weight_window import WeightWindow
from punctual.plan import KVCopyOrders, KVEviction, ModelRunnerOutput, ScheduledRequest, StepPlan
from punctual.runner.allocator import keep_step_buffers_mapped
from punctual.runner.decode_graphs import DecodeGraphs
from punctual.runner.kv_transfer import write_blocks
from punctual.runner.sampler import RequestState, Sampler, accept_greedy, with_logit_bias
from punctual.runner.tier_store import TierStore
from punctual.structured.guide import Guide

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompt chunks of at least this many tokens attend through SDPA even where the fused attention
# kernel takes decodes (ModelRunner._prompts_through_sdpa).
PROMPT_SDPA_MIN_ROWS = 64


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def pick_dtype(name: str, arch: ModelArchConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        name = arch.checkpoint_dtype if arch.checkpoint_dtype in DTYPES else "float32"
        if name == "float16" and device.type == "cpu":
            name = "bfloat16"  # CPUs have fast bf16 (AVX-512 bf16), not fp16
    return DTYPES[name]


def kv_cache_is_quantized(name: str, model_dtype: torch.dtype) -> bool:
    """True for an int8 KV cache; otherwise the cache is kept in the model dtype."""
    if name == "int8":
        return True
    if name == "auto" or DTYPES.get(name) == model_dtype:
        return False
    raise ValueError(f"kv_cache_dtype {name!r} must be auto, int8 or the model dtype "
                     f"({str(model_dtype).removeprefix('torch.')})")


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def decode_bucket_bounds(ctx_lens: list[int], max_buckets: int = MAX_DECODE_BUCKETS,
                         min_bucket: int = 8) -> list[tuple[int, int]]:
    """Cut ascending context lengths into at most `max_buckets` runs of similar length.

    Greedy: close a bucket once its longest context is more than 1.5x its shortest and it
    holds at least `min_bucket` sequences; the last bucket takes the rest.
    """
    bounds, start = [], 0
    for i in range(1, len(ctx_lens)):
        if len(bounds) == max_buckets - 1:
            break
        if i - start >= min_bucket and ctx_lens[i] > 1.5 * ctx_lens[start]:
            bounds.append((start, i))
            start = i
    if ctx_lens:
        bounds.append((start, len(ctx_lens)))
    return bounds


def split_by_query_length(num_new_tokens: list[int], start_positions: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Indices of one-token queries, short queries (2..MAX_SHORT_QUERY) and longer chunks; the
    first two sorted by the context they reach, so that each attention bucket pads little."""
    reach = lambda i: start_positions[i] + num_new_tokens[i]  # noqa: E731
    indices = range(len(num_new_tokens))
    decodes = sorted((i for i in indices if num_new_tokens[i] == 1), key=reach)
    shorts = sorted((i for i in indices if 1 < num_new_tokens[i] <= MAX_SHORT_QUERY), key=reach)
    longs = [i for i in indices if num_new_tokens[i] > MAX_SHORT_QUERY]
    return decodes, shorts, longs


@dataclass
class TokenChunk:
    """Tokens to feed at consecutive positions from `start_position`, outside a scheduler plan
    (a draft model's catch-up and its proposals)."""

    token_ids: list[int]
    start_position: int
    block_table: list[int]

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def block_ids(self) -> list[int]:
        return self.block_table

    @property
    def blocks(self) -> torch.Tensor:
        return torch.tensor(self.block_table, dtype=torch.long)


@dataclass
class _Chunk:
    """One request's rows of a step, as the attention metadata sees them."""

    token_ids: list[int]  # known tokens, then proposals
    start_position: int
    block_ids: list[int]
    blocks: torch.Tensor  # block_ids as a tensor (kept per request, so not rebuilt every step)
    item: ScheduledRequest | None = None
    state: RequestState | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, max_num_seqs: int,
                 shared_kv_bytes_per_block: int = 0, lora_config: LoRAConfig | None = None,
                 tensor_parallel: RankGroup | None = None):
        """`shared_kv_bytes_per_block`: KV bytes another pool (a draft model's) needs beside each
        of this runner's blocks; both come out of the same `kv_cache_memory`. `lora_config`: serve
        LoRA adapters when it enables them. `tensor_parallel`: this process's rank of a group that
        splits the model (runner/tensor_parallel.py); the runner then holds its rank's shard of the
        weights and of the KV cache (`arch` is the shard's), and only rank 0 samples."""
        path = resolve_model_path(model_config.model)
        self.arch = load_arch_config(path)
        self.device = pick_device(model_config.device)
        if self.device.type == "cpu":
            keep_step_buffers_mapped()
        self.dtype = pick_dtype(model_config.dtype, self.arch, self.device)
        # With int4, a GGUF file's 4-bit layers run as the file holds them (not re-quantized from
        # their dequantized values); otherwise they are dense, as every other checkpoint.
        int4 = model_config.quantization == "int4"
        choices = KernelChoices(model_config.fused_attention, model_config.decode_stack,
                                model_config.int4_int8_activations)
        self.samples = tensor_parallel is None or tensor_parallel.rank == 0
        if model_config.max_weight_memory is not None:  # a sliding window of layers where they exceed it
            # With tensor parallelism, of the rank's shard and within the rank's budget (it is per rank).
            if tensor_parallel is not None and tensor_parallel.rank > 0:
                # A rank process shows warnings only (runner/tensor_parallel.py); its window's size and
                # layer cache are its own, so each rank reports them as rank 0 does.
                logging.getLogger(weight_stream.__name__).setLevel(logging.INFO)
            self.model = weight_stream.load_model(path, self.arch, self.device, self.dtype, int4,
                                                  int(model_config.max_weight_memory), tensor_parallel,
                                                  quantization=model_config.quantization,
                                                  enforce_eager=model_config.enforce_eager,
                                                  batch_invariant=model_config.batch_invariant, kernel_choices=choices)
            self.arch = self.model.arch  # the shard's, under tensor parallelism
        else:
            if tensor_parallel is None:
                weights = load_weights(path, self.dtype, int4)
            else:  # the rank's rows and columns only, read from the files; dense, quantized after the split
                self.arch, weights = load_shard(path, self.dtype, self.arch, architecture(self.arch.architecture).names,
                                                tensor_parallel.rank, tensor_parallel.size)
            self.model = DecoderModel(self.arch, weights, self.device, self.dtype,
                                      model_config.quantization, model_config.enforce_eager,
                                      model_config.batch_invariant, choices, tensor_parallel)
        self.model_path = path
        self.max_model_len = min(model_config.max_model_len or self.arch.max_positions, self.arch.max_positions)
        self.block_size = cache_config.block_size
        self.kv_quantized = kv_cache_is_quantized(cache_config.kv_cache_dtype, self.dtype)
        # Tokens that attend through the fused kernel: it reads a bf16 cache, and an int8 one for the
        # head shapes its specialised loops take.
        self.attention_kernel = self.model.attention_kernel
        self.batch_invariant = model_config.batch_invariant
        # The layers' attention windows, full (None) first: one metadata each per step.
        self.attention_windows = self.arch.attention_windows
        if self.kv_quantized and not int8_kv_attention_supported(self.arch.head_dim, self.arch.num_heads,
                                                                 self.arch.num_kv_heads):
            if model_config.batch_invariant:
                raise ValueError(f"batch_invariant with kv_cache_dtype int8 needs the attention kernel's int8 reads: "
                                 f"head dim 64 or 128 and at most 8 query heads per KV head, this model has head "
                                 f"dim {self.arch.head_dim} and {self.arch.num_heads} / {self.arch.num_kv_heads}; "
                                 f"use a bf16 KV cache")
            self.attention_kernel = "none"
        # Quest: decodes from sparse_min_context tokens on attend over at most budget_blocks blocks.
        self.sparse_attention = model_config.sparse_attention
        self.sparse_budget_blocks = model_config.sparse_token_budget // self.block_size
        self.sparse_min_context = model_config.sparse_min_context
        self.num_blocks = self._num_blocks(cache_config, max_num_seqs, shared_kv_bytes_per_block)
        if tensor_parallel is not None:  # one block table for every rank: the pool all of them hold
            self.num_blocks = tensor_parallel.min_int(self.num_blocks)
        # One block past the pool's: the scratch block, given to no request, where the padded rows of
        # a captured decode step write their K/V (decode_graphs).
        self.scratch_block = self.num_blocks
        self.kv_caches = [LayerKVCache(self.num_blocks + 1, self.block_size, self.arch.num_kv_heads,
                                       self.arch.head_dim, self.dtype, self.device, self.kv_quantized,
                                       summaries=self.sparse_attention is not None)
                          for _ in range(self.arch.num_layers)]
        self.tier_store = None
        if cache_config.kv_tier_memory and cache_config.enable_prefix_caching:
            compressed = cache_config.kv_tier_dtype == "int8" or (
                cache_config.kv_tier_dtype == "auto" and self.device.type == "cpu")
            per_block = TierStore.bytes_per_block(self.arch.num_layers, self.block_size, self.arch.num_kv_heads,
                                                  self.arch.head_dim, self.dtype, compressed or self.kv_quantized)
            num_slots = int(cache_config.kv_tier_memory) // per_block
            if num_slots < 1:
                raise ValueError(f"kv_tier_memory of {cache_config.kv_tier_memory} bytes holds no KV block "
                                 f"({per_block} bytes per block)")
            self.tier_store = TierStore(self.kv_caches, num_slots, compressed)
        self.sampler = Sampler(self.device, model_config.seed, self.model.kernels)
        self.guide = Guide(self.arch.vocab_size)  # structured output: per-request grammar matchers
        # What the runner keeps across steps per request, updated from the plans (vLLM v1's input batch).
        self.requests: dict[str, RequestState] = {}
        # LoRA: the loaded adapters (LRU) and the adapter of each request that has one.
        self.lora_config = lora_config if lora_config is not None and lora_config.enable_lora else None
        self.adapters = (AdapterCache(self.lora_config.max_cpu_loras, self.read_adapter)
                         if self.lora_config is not None else None)
        self.request_adapters: dict[str, LoRARequest] = {}
        self.key_shifter: KeyShifter | None = None  # attention sinks: built at the first eviction
        logger.info("model %s on %s/%s: %d KV blocks of %d tokens", path, self.device, self.dtype,
                    self.num_blocks, self.block_size)
        # Decode steps replayed from CUDA graphs (on CUDA, unless enforce_eager); None: every step eager.
        self.decode_graphs: DecodeGraphs | None = None
        max_graph_batch = min(model_config.cuda_graph_max_batch_size, max_num_seqs)
        if self.sparse_attention is not None and self.device.type == "cuda" and max_graph_batch > 0:
            # A step writes the summaries of the blocks it fills, a number that varies: not capturable.
            logger.info("sparse_attention %s: decode steps run eagerly (no CUDA graphs)", self.sparse_attention)
            max_graph_batch = 0
        # A captured graph reads the weights where they were at capture: none under a weight window.
        windowed = isinstance(self.model.layers, WeightWindow)
        if self.device.type == "cuda" and not model_config.enforce_eager and max_graph_batch > 0 and not windowed:
            try:
                self.use_decode_graphs(max_graph_batch)
            except RuntimeError as error:  # a CUDA error or out of memory while capturing
                logger.warning("CUDA graph capture failed (%s): decode steps run eagerly "
                               "(--enforce-eager skips the capture)", error)

    def read_adapter(self, request: LoRARequest) -> LoRAAdapter:
        """An adapter's weights read from disk and checked against this model (ValueError naming
        the problem); safe on another thread: it touches nothing of the runner's."""
        return load_adapter(request, self.arch, architecture(self.arch.architecture).names,
                            self.lora_config.max_lora_rank, self.device, self.dtype)

    def keep_adapter(self, request: LoRARequest, adapter: LoRAAdapter) -> None:
        """Add an adapter read by `read_adapter` (elsewhere) to the loaded set."""
        self.adapters.check_path(request)
        self.adapters.put(request, adapter)

    def load_adapter(self, request: LoRARequest) -> LoRAAdapter:
        """Load (or touch) an adapter: ValueError naming what is wrong with it, or that LoRA is off."""
        if self.adapters is None:
            raise ValueError(f"LoRA adapter {request.lora_name!r} asked for, but LoRA is not enabled "
                             "(enable_lora=True, or --enable-lora)")
        return self.adapters.get(request)

    def _lora_step(self, ordered: list[_Chunk]) -> LoRAStep | None:
        """The step's adapters and their rows in the flat token layout; None when every row is the base model's."""
        if not self.request_adapters:
            return None
        rows: dict[int, list[int]] = {}
        requests: dict[int, LoRARequest] = {}
        offset = 0
        for c in ordered:
            lora = self.request_adapters.get(c.item.request_id)
            if lora is not None:
                rows.setdefault(lora.lora_int_id, []).extend(range(offset, offset + c.num_new_tokens))
                requests[lora.lora_int_id] = lora
            offset += c.num_new_tokens
        if not rows:
            return None
        groups = []
        for lora_int_id, indices in rows.items():
            every = len(indices) == offset  # one adapter for the whole step: no gather, no scatter
            groups.append((None if every else torch.tensor(indices, dtype=torch.long, device=self.device),
                           self.adapters.get(requests[lora_int_id])))
        return LoRAStep(groups, offset, self.model.kernels if self.device.type == "cpu" else None)

    def use_decode_graphs(self, max_batch_size: int, capture: bool = True) -> DecodeGraphs:
        """Serve decode steps of up to `max_batch_size` requests from static, bucketed steps: captured
        as CUDA graphs (`capture`, CUDA only), or run as the same static ops without capture (any
        device: what the CPU tests check the padding and buckets with)."""
        self.decode_graphs = None  # a failed capture leaves none
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, self.scratch_block,
                                          max_batch_size, self.max_model_len, capture)
        return self.decode_graphs

    @property
    def kv_bytes_per_block(self) -> int:
        per_token = LayerKVCache.bytes_per_token(self.arch.num_kv_heads, self.arch.head_dim, self.dtype,
                                                 self.kv_quantized)
        summary = (LayerKVCache.summary_bytes_per_block(self.arch.num_kv_heads, self.arch.head_dim, self.dtype)
                   if self.sparse_attention is not None else 0)
        return self.arch.num_layers * (self.block_size * per_token + summary)

    def _num_blocks(self, cache: CacheConfig, max_num_seqs: int, shared_bytes_per_block: int) -> int:
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        per_block = self.kv_bytes_per_block + shared_bytes_per_block
        if cache.kv_cache_memory is not None:
            budget = int(cache.kv_cache_memory)
        else:
            budget = int(available_memory_bytes(self.device) * cache.kv_cache_memory_fraction)
            # More than every sequence at full length is never used.
            cap_tokens = max_num_seqs * self.max_model_len
            budget = min(budget, cap_tokens * per_block // self.block_size)
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no KV block "
                             f"({per_block} bytes per block of {self.block_size} tokens)")
        return blocks

    @property
    def num_tier_slots(self) -> int:
        return self.tier_store.num_slots if self.tier_store is not None else 0

    def copy_kv(self, copies: KVCopyOrders) -> None:
        """Make the step's copies between the KV pool and the second tier: every copy out first."""
        if copies.swap_out:
            blocks, slots = zip(*copies.swap_out)
            self.tier_store.copy_out(self.kv_caches, list(blocks), list(slots))
        if copies.swap_in:
            slots, blocks = zip(*copies.swap_in)
            self.tier_store.copy_in(self.kv_caches, list(slots), list(blocks))
            self._refresh_summaries(list(blocks))
        for block_ids, payload in copies.writes:
            write_blocks(self.kv_caches, list(block_ids), payload)
            self._refresh_summaries(list(block_ids))

    def _refresh_summaries(self, block_ids: list[int]) -> None:
        """Summaries of blocks whose keys were copied in (computed from the keys: a tier or a peer
        never has to carry them)."""
        if self.sparse_attention is not None and block_ids:
            ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            for cache in self.kv_caches:
                cache.summarize(ids)

    # ---- per-request state, from the plans ----------------------------------------------
    def _update_states(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
            self.request_adapters.pop(request_id, None)
            self.sampler.forget(request_id)
            self.guide.forget(request_id)
        for eviction in plan.kv_evictions:
            self._evict(eviction)
        for item in plan.scheduled:
            if item.new is not None:
                if item.new.grammar is not None and item.request_id not in self.guide.matchers:
                    self.guide.start(item.request_id, item.new.grammar)
                if item.new.lora_request is not None:
                    self.request_adapters[item.request_id] = item.new.lora_request
                # Admitted (or re-admitted after a preemption): a new block table. The sampler's
                # seeded generator lives on, so a preempted request draws what it would have.
                self.requests[item.request_id] = RequestState(item.request_id, item.new.sampling_params,
                                                              list(item.new_block_ids),
                                                              item.new.prompt_token_ids, item.new.output_token_ids,
                                                              self.arch.vocab_size, self.device)
            else:
                self.requests[item.request_id].add_blocks(item.new_block_ids)

    def _evict(self, eviction: KVEviction) -> None:
        """Attention sinks: drop the evicted blocks from the request's table and move the window's
        keys to the positions they now have in the cache."""
        if eviction.in_runner_table:
            state = self.requests[eviction.request_id]
            del state.block_ids[eviction.first_block:eviction.first_block + eviction.num_blocks]
            state.blocks = torch.tensor(state.block_ids, dtype=torch.long)
        if self.key_shifter is None:
            self.key_shifter = KeyShifter(self.arch, self.arch.max_positions, self.device)
        shift = eviction.num_blocks * self.block_size
        self.key_shifter.shift(self.kv_caches, eviction.window_block_ids,
                               eviction.first_block * self.block_size + shift, shift)

    # ---- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        """Make the plan's KV copies, run the model over its chunks, sample where a chunk reaches
        the end of its tokens (and verify speculated tokens)."""
        self._update_states(plan)
        if plan.kv_copies:
            self.copy_kv(plan.kv_copies)
        output = ModelRunnerOutput()
        if not plan.scheduled:
            return output
        chunks = []
        for item in plan.scheduled:
            state = self.requests[item.request_id]
            # Attention sinks: the chunk's KV positions, less the tokens evicted before it.
            chunks.append(_Chunk([*item.token_ids, *item.spec_token_ids], item.start_position - item.position_offset,
                                 state.block_ids, state.blocks, item, state))
        groups = [[chunks[i] for i in group] for group in split_by_query_length(
            [c.num_new_tokens for c in chunks], [c.start_position for c in chunks])]
        num_sparse = 0
        if self.sparse_attention is not None:
            groups[0], num_sparse = self._partition_sparse(groups[0])
        ordered = groups[0] + groups[1] + groups[2]
        lora = self._lora_step(ordered)
        # None unless a captured decode step takes this one (captured without adapters).
        logits = self._replay_decode(ordered) if lora is None and not num_sparse else None
        if logits is None:
            input_ids, positions, slots = self._flat_inputs(ordered)
            meta = self._metadata(*groups, slots, positions, num_sparse)
            hidden = self.model.forward(input_ids, positions, meta, self.kv_caches, lora)
            self._prompt_logprobs(ordered, hidden, output)

        # Logits rows: the last position of each sampling chunk, or every verified position.
        rows, offset = [], 0
        plain: list[tuple[int, _Chunk]] = []
        spec: list[tuple[int, _Chunk]] = []
        for c in ordered:
            offset += c.num_new_tokens
            if c.item.samples:
                n_rows = c.item.num_sampled_rows
                (spec if c.item.spec_token_ids else plain).append((len(rows), c))
                rows.extend(range(offset - n_rows, offset))
        if not rows:
            return output
        if logits is None:
            # Every row (a step of decodes): the hidden states as they are, no gather.
            every_row = len(rows) == hidden.shape[0] and rows[-1] == len(rows) - 1
            logits = self.model.logits(hidden if every_row else hidden[torch.tensor(rows, device=self.device)])
        if not self.samples:  # a tensor-parallel rank other than 0: its share of the step is done
            return output
        if self.guide.matchers:  # structured output: mask only the rows of guided requests
            self.guide.mask(logits, [(row, c.state.request_id, c.item.spec_token_ids) for row, c in plain + spec])
        sampled, logprobs = output.sampled_token_ids, output.logprobs
        if plain:
            states = [c.state for _, c in plain]
            if len(plain) == logits.shape[0]:  # no verification rows: the plain rows are all of them, in order
                tokens, lps = self.sampler.sample(logits, states)
            else:
                tokens, lps = self.sampler.sample(logits[torch.tensor([row for row, _ in plain], device=self.device)],
                                                  states)
            for state, token, lp in zip(states, tokens, lps):
                sampled[state.request_id] = [token]
                if lp is not None:
                    logprobs[state.request_id] = [lp]
        # Verification, batched: greedy requests share one argmax, sampling ones one distribution call.
        greedy_targets = None
        greedy_spec = [(row, 1 + len(c.item.spec_token_ids), c.state) for row, c in spec
                       if c.state.sampling_params.greedy]
        if greedy_spec:  # logit_bias moves the argmax; the logprobs below stay the model's
            greedy_targets = self.sampler.argmax(with_logit_bias(logits, greedy_spec)).tolist()
        sampling = []
        for row, c in spec:
            drafts = c.item.spec_token_ids
            n_rows = 1 + len(drafts)
            if c.state.sampling_params.greedy:
                tokens = accept_greedy(greedy_targets[row:row + n_rows], drafts)
                sampled[c.state.request_id] = tokens
                lps = self.sampler.verified_logprobs(logits[row:row + n_rows], c.state, tokens)
                if lps is not None:
                    logprobs[c.state.request_id] = lps
                continue
            q = c.item.draft_probs  # a draft model's distributions; None for prompt lookup
            sampling.append((row, c.state, drafts, None if q is None else q[:len(drafts)]))
        if sampling:
            for (_, state, _, _), (tokens, lps) in zip(sampling, self.sampler.verify_sampled(logits, sampling)):
                sampled[state.request_id] = tokens
                if lps is not None:
                    logprobs[state.request_id] = lps
        for request_id, tokens in sampled.items():
            self.requests[request_id].add_output(tokens)
        if self.guide.matchers:  # roll back the proposals masking consumed; consume the kept tokens
            self.guide.advance(sampled)
        return output

    def _partition_sparse(self, decodes: list[_Chunk]) -> tuple[list[_Chunk], int]:
        """The decodes, dense ones first (still by context), then those that attend sparsely: at a
        context of sparse_min_context or more, unless the request turned it off; and their count.
        No sparse decode where every such context fits the budget: the selection would keep every
        block, and the step keeps the whole-stack kernel."""
        sparse = [c.start_position + 1 >= self.sparse_min_context and c.state.sampling_params.sparse_attention
                  is not False for c in decodes]
        budget = self.sparse_budget_blocks * self.block_size
        if not any(s and c.start_position + 1 > budget for c, s in zip(decodes, sparse)):
            return decodes, 0
        return ([c for c, s in zip(decodes, sparse) if not s] + [c for c, s in zip(decodes, sparse) if s],
                sum(sparse))

    def _replay_decode(self, ordered: list[_Chunk]) -> torch.Tensor | None:
        """The step's logits [len(ordered), vocab] from a captured decode step, or None where the
        step runs eagerly. A captured step takes one sampled token per request and nothing else: no
        prompt chunk, no speculated token, no prompt position to score."""
        if self.decode_graphs is None:
            return None
        for c in ordered:
            if c.num_new_tokens != 1 or not c.item.samples or c.item.spec_token_ids:
                return None
            prompt = c.state.prompt_token_ids  # kept only where prompt logprobs are asked for
            if prompt is not None and c.item.start_position < len(prompt) - 1:
                return None
        input_ids, positions, slots = self._flat_inputs(ordered)
        return self.decode_graphs.run(input_ids, positions, slots, [c.blocks for c in ordered],
                                      max(c.start_position for c in ordered) + 1)

    @torch.inference_mode()
    def last_logits(self, chunks: list[TokenChunk]) -> torch.Tensor:
        """Feed each chunk (writing its KV through its block table) and return the logits at each
        chunk's last token, [len(chunks), vocab], in the order given."""
        index_groups = split_by_query_length([c.num_new_tokens for c in chunks], [c.start_position for c in chunks])
        order = [i for group in index_groups for i in group]
        groups = [[chunks[i] for i in group] for group in index_groups]
        input_ids, positions, slots = self._flat_inputs(groups[0] + groups[1] + groups[2])
        last_rows = torch.cumsum(torch.tensor([c.num_new_tokens for c in groups[0] + groups[1] + groups[2]]), 0) - 1
        meta = self._metadata(*groups, slots, positions)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
        ordered_logits = self.model.logits(hidden[last_rows.to(self.device)])
        logits = torch.empty_like(ordered_logits)
        logits[torch.tensor(order, device=self.device)] = ordered_logits
        return logits

    def _prompt_logprobs(self, ordered: list[_Chunk], hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Score the prompt tokens a chunk's positions predict (prompt_logprobs): position p's
        logits give the logprob of prompt token p + 1. The last prompt position predicts the first
        output token, which is sampled, not scored."""
        offset = 0
        for c in ordered:
            prompt = c.state.prompt_token_ids if c.state is not None else None
            start = c.item.start_position  # in the prompt, not the cache (attention sinks)
            if prompt is not None and start < len(prompt) - 1:
                end = min(start + c.num_new_tokens, len(prompt) - 1)
                count = end - start
                rows = torch.arange(offset, offset + count, device=self.device)
                logprobs = torch.log_softmax(self.model.logits(hidden[rows]).float(), dim=-1)
                targets = prompt[start + 1:end + 1]
                top_k = c.state.sampling_params.prompt_logprobs
                output.prompt_logprobs[c.state.request_id] = [
                    Sampler._token_logprobs(logprobs[i], token, top_k) for i, token in enumerate(targets)]
            offset += c.num_new_tokens

    def _flat_inputs(self, ordered: list[_Chunk]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for c in ordered:
            start, end, table = c.start_position, c.start_position + c.num_new_tokens, c.block_ids
            input_ids.extend(c.token_ids)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(input_ids), as_tensor(positions), as_tensor(slots)

    def _padded_tables(self, items: list[_Chunk], num_tokens_each: list[int]):
        """[B, max_blocks] block tables, zero-padded: one C call over per-request tensors, so the
        Python work grows with the batch, not with the context."""
        bs = self.block_size
        max_blocks = max(-(-n // bs) for n in num_tokens_each)
        tables = torch.nn.utils.rnn.pad_sequence([c.blocks[:max_blocks] for c in items], batch_first=True)
        return tables.to(self.device), max_blocks * bs

    def _metadata(self, decodes: list[_Chunk], shorts: list[_Chunk], prefills: list[_Chunk],
                  slots: torch.Tensor, positions: torch.Tensor, num_sparse: int = 0) -> AttentionMetadata:
        """Attention metadata for tokens laid out as decodes, short queries, then prompt chunks
        (the first two each sorted by the context they reach); `slots` and `positions` are
        _flat_inputs' for that layout. A model with full and sliding-window layers gets the
        sliding layers' metadata as its `local`. The last `num_sparse` decodes attend sparsely in
        the full-attention layers (Quest), densely in sliding-window ones."""
        windows = self.attention_windows
        meta = self._window_metadata(decodes, shorts, prefills, slots, positions, windows[0],
                                     num_sparse if windows[0] is None else 0)
        if self.sparse_attention is not None:
            meta.filled_blocks = self._filled_blocks(decodes + shorts + prefills)
        if len(windows) > 1:
            if self.attention_kernel == "all" and not self._prompts_through_sdpa(prefills):  # the kernel takes the window
                meta.local = dataclasses.replace(meta, kernel_window=windows[1], window=windows[1], sparse=None)
            else:
                meta.local = self._window_metadata(decodes, shorts, prefills, slots, positions, windows[1])
        return meta

    def _filled_blocks(self, chunks: list[_Chunk]) -> torch.Tensor | None:
        """The blocks whose last slot the chunks write (Python work per block, not per token)."""
        bs, filled = self.block_size, []
        for c in chunks:
            end = c.start_position + c.num_new_tokens
            filled += c.block_ids[c.start_position // bs:end // bs]  # block b fills at position b*bs + bs-1
        return torch.tensor(filled, dtype=torch.long, device=self.device) if filled else None

    def _sparse_metadata(self, items: list[_Chunk], start: int) -> SparseDecode:
        """The sparse decodes (tokens start.. of the step): their whole tables and contexts."""
        lens = [c.start_position + 1 for c in items]
        tables, _ = self._padded_tables(items, lens)
        return SparseDecode(start, start + len(items), tables, torch.tensor(lens, device=self.device),
                            self.sparse_budget_blocks)

    def _window_metadata(self, decodes: list[_Chunk], shorts: list[_Chunk], prefills: list[_Chunk],
                         slots: torch.Tensor, positions: torch.Tensor, window: int | None,
                         num_sparse: int = 0) -> AttentionMetadata:
        num_dense = len(decodes) - num_sparse
        sparse = self._sparse_metadata(decodes[num_dense:], num_dense) if num_sparse else None
        if self.attention_kernel == "all":
            if not self._prompts_through_sdpa(prefills):
                meta = self._kernel_metadata(decodes + shorts + prefills, slots, positions, window)
                meta.sparse = sparse
                return meta
            # Decodes and short queries through the kernel, prompt chunks through SDPA (below).
            num_kernel = sum(c.num_new_tokens for c in decodes + shorts)
            meta = self._prefill_metadata(prefills, slots, num_kernel, window)
            if num_kernel:
                kernel = self._kernel_metadata(decodes + shorts, slots, positions[:num_kernel], window)
                meta.kernel_tokens, meta.kernel_block_tables = kernel.kernel_tokens, kernel.kernel_block_tables
                meta.kernel_seq_of_token, meta.kernel_positions = kernel.kernel_seq_of_token, kernel.kernel_positions
                meta.kernel_window = kernel.kernel_window
            meta.sparse = sparse
            return meta
        buckets = []
        for start, end in decode_bucket_bounds([s.start_position + 1 for s in decodes[:num_dense]]):
            items = decodes[start:end]
            ctx_lens = [s.start_position + 1 for s in items]
            tables, ctx = self._padded_tables(items, ctx_lens)
            buckets.append(DecodeBucket(start, end, tables, functools.partial(self._decode_mask, ctx_lens, ctx, window)))
        token = len(decodes)
        group_size = self.arch.num_heads // self.arch.num_kv_heads
        for start, end in decode_bucket_bounds([s.start_position + s.num_new_tokens for s in shorts]):
            items = shorts[start:end]
            q_lens = [s.num_new_tokens for s in items]
            tables, ctx = self._padded_tables(items, [s.start_position + s.num_new_tokens for s in items])
            q_len = max(q_lens)
            pad_index = self._pad_index(q_lens)
            starts = [s.start_position for s in items]

            def short_mask(starts=starts, q_lens=q_lens, ctx=ctx) -> torch.Tensor:
                # Rows repeated per query head of a KV head: the row order of short_query_attention.
                return self._chunk_mask(starts, q_lens, ctx, window).repeat(1, 1, group_size, 1)

            buckets.append(DecodeBucket(token, token + sum(q_lens), tables, short_mask, q_len, pad_index))
            token += sum(q_lens)

        meta = self._prefill_metadata(prefills, slots, token, window)
        meta.decode_buckets, meta.sparse = buckets, sparse
        return meta

    def _prompts_through_sdpa(self, prefills: list[_Chunk]) -> bool:
        """Whether this step's prompt chunks attend through PyTorch's SDPA although the fused kernel
        takes every other token: the kernel walks keys one query row at a time, which suits decodes
        and short queries but took 39 s for an 8,152-token smollm2 prompt (2,048-token chunks)
        where SDPA's tiled kernels take a few. batch_invariant keeps every token in the kernel."""
        return (not self.batch_invariant and bool(prefills)
                and max(c.num_new_tokens for c in prefills) >= PROMPT_SDPA_MIN_ROWS)

    def _prefill_metadata(self, prefills: list[_Chunk], slots: torch.Tensor, num_before: int,
                          window: int | None) -> AttentionMetadata:
        """Metadata for prompt chunks attending through SDPA after `num_before` other tokens."""
        prefill_tables = prefill_mask = pad_index = None
        max_q, fresh = 0, False
        if prefills:
            q_lens = [s.num_new_tokens for s in prefills]
            starts = [s.start_position for s in prefills]
            max_q = max(q_lens)
            fresh = len(prefills) == 1 and starts[0] == 0 and (not window or q_lens[0] <= window)
            if not fresh:
                prefill_tables, ctx = self._padded_tables(prefills, [a + b for a, b in zip(starts, q_lens)])
                prefill_mask, pad_index = self._chunk_mask(starts, q_lens, ctx, window), self._pad_index(q_lens)
        return AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=num_before, decode_buckets=[], prefill_block_tables=prefill_tables,
            prefill_mask=prefill_mask, prefill_pad_index=pad_index, prefill_max_q=max_q, prefill_fresh_causal=fresh,
            window=window)

    def _kernel_metadata(self, items: list[_Chunk], slots: torch.Tensor, positions: torch.Tensor,
                         window: int | None) -> AttentionMetadata:
        """Metadata where every token (those of `items`, in order) attends through the fused kernel."""
        dev = self.device
        q_lens = [c.num_new_tokens for c in items]
        tables, _ = self._padded_tables(items, [c.start_position + c.num_new_tokens for c in items])
        num_tokens = sum(q_lens)
        if num_tokens == len(items):  # one token each (decodes): token i is sequence i's
            seq_of_token = torch.arange(num_tokens, device=dev)
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(q_lens)).to(dev)
        return AttentionMetadata(slot_mapping=slots, num_decode_tokens=num_tokens, decode_buckets=[],
                                 prefill_block_tables=None, prefill_mask=None, prefill_pad_index=None,
                                 prefill_max_q=0, prefill_fresh_causal=False, kernel_tokens=num_tokens,
                                 kernel_block_tables=tables, kernel_seq_of_token=seq_of_token,
                                 kernel_positions=positions, kernel_window=window or 0, window=window)

    def _decode_mask(self, ctx_lens: list[int], ctx: int, window: int | None) -> torch.Tensor:
        """[n, 1, 1, ctx]: each one-token query sees its context (within the sliding window)."""
        return decode_mask(torch.tensor(ctx_lens, device=self.device), ctx, window)

    def _pad_index(self, q_lens: list[int]) -> torch.Tensor:
        """The row of each real token when queries are padded to the longest, [sum(q_lens)]."""
        max_q = max(q_lens)
        return torch.cat([torch.arange(q) + b * max_q for b, q in enumerate(q_lens)]).to(self.device)

    def _chunk_mask(self, starts: list[int], q_lens: list[int], ctx: int, window: int | None) -> torch.Tensor:
        """Causal mask [B, 1, max_q, ctx] for multi-token queries padded to the longest."""
        dev = self.device
        max_q = max(q_lens)
        key_pos = torch.arange(ctx, device=dev)[None, None, :]
        q_pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(max_q, device=dev)[None, :]
        q_pos = q_pos[:, :, None]  # [B, max_q, 1]
        visible = key_pos <= q_pos
        if window:
            visible &= key_pos > q_pos - window
        # Padding rows see key 0 only, so softmax stays finite; their output is dropped.
        is_pad = torch.arange(max_q, device=dev)[None, :] >= torch.tensor(q_lens, device=dev)[:, None]
        visible |= is_pad[:, :, None] & (key_pos == 0)
        return visible[:, None, :, :]
