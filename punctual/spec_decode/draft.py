"""Draft-model proposer: a smaller checkpoint with the same tokenizer drafts the next tokens.

The draft model has its own weights and its own paged KV cache (its own pool and block tables,
in the same process and on the same device as the target). Per request it remembers which
tokens its cache holds; after verification, the tokens it drafted that the target rejected are
rolled back by comparing them with the request's real tokens, and the next proposal first
feeds what it has not seen (the target's corrected token, or a whole prompt the first time),
then drafts K tokens one batched forward at a time.

For sampled requests the draft samples from its own distribution q (with the request's
temperature / top-k / top-p applied) and hands q to the verifier, which accepts with
probability min(1, p/q): the output follows the target's distribution exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from punctual.config import CacheConfig, ModelConfig
from punctual.runner.runner import ModelRunner, TokenChunk
from punctual.runner.sampler import Sampler, draw
from punctual.request import Request
from punctual.spec_decode.proposer import Proposal

logger = logging.getLogger(__name__)


def draft_kv_bytes_per_block(model: str, target: ModelConfig, cache: CacheConfig) -> int:
    """KV bytes the draft model needs beside each of the target's blocks: the engine sizes both
    pools from one `kv_cache_memory`, one draft block per target block (the draft shares no
    prefixes, but holds only the running requests' tokens)."""
    from punctual.models.attention import LayerKVCache
    from punctual.checkpoints.loader import resolve_model_path
    from punctual.models.registry import load_arch_config
    from punctual.runner.runner import pick_device, pick_dtype

    arch = load_arch_config(resolve_model_path(model))
    # The draft runs in the target's dtype; with `auto`, its own checkpoint's is the estimate.
    dtype = pick_dtype(target.dtype, arch, pick_device(target.device))
    return arch.num_layers * cache.block_size * LayerKVCache.bytes_per_token(arch.num_kv_heads, arch.head_dim,
                                                                             dtype, False)


@dataclass
class DraftState:
    """What the draft's KV cache holds for one request."""

    blocks: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens whose KV is cached, by position
    verified: int = 0  # fed[:verified] are known to be the request's real tokens
    generator: torch.Generator | None = None  # seeded requests draft reproducibly


class DraftModelProposer:
    name = "draft"

    def __init__(self, model: str, target: ModelRunner, num_blocks: int, max_num_seqs: int,
                 max_speculative_tokens: int, clock: Callable[[], float], seed: int = 0, catch_up_tokens: int = 512):
        """`num_blocks`: the draft's share of the engine's KV budget (the engine sizes both pools
        together, see `draft_kv_bytes_per_block`). `clock`: the caller's clock, for the cost of
        one drafted token."""
        dtype = str(target.dtype).removeprefix("torch.")
        self.runner = ModelRunner(ModelConfig(model=model, dtype=dtype, device=str(target.device), seed=seed),
                                  CacheConfig(block_size=target.block_size, num_kv_blocks=num_blocks,
                                              enable_prefix_caching=False), max_num_seqs)
        if self.runner.arch.vocab_size != target.arch.vocab_size:
            raise ValueError(f"speculative_model {model!r} has a vocabulary of {self.runner.arch.vocab_size} tokens; "
                             f"the target has {target.arch.vocab_size}: a draft model must share the tokenizer")
        self.block_size = target.block_size
        self.catch_up_tokens = catch_up_tokens
        self.max_speculative_tokens = max_speculative_tokens
        self.max_len = self.runner.max_model_len
        self.clock = clock
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.states: dict[str, DraftState] = {}
        self.generator = torch.Generator(device=self.runner.device).manual_seed(seed + 1)
        self.depth_cost_s = 0.0  # measured time of one batched draft forward (exponential average)
        logger.info("draft model %s: %d KV blocks", self.runner.model_path, num_blocks)

    def available(self, request: Request, max_tokens: int) -> int:
        """A draft model can always try: it drafts only what the scheduler then chooses."""
        return max_tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def forget(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self.free_blocks.extend(state.blocks)

    def propose(self, wanted: list[tuple[Request, int]]) -> dict[str, Proposal]:
        """Draft up to k tokens for each (request, k); requests that do not fit are left out.

        A request the draft has not seen yet must first be fed its whole prompt: at most
        `catch_up_tokens` such tokens per call, so that a burst of new long prompts is spread
        over steps (as the target's chunked prefill is); a request still catching up drafts later.
        """
        active: list[tuple[Request, int, DraftState]] = []
        partial: list[tuple[Request, DraftState, int]] = []
        budget = self.catch_up_tokens
        for request, k in wanted:
            state = self._sync(request)
            missing = request.num_tokens - len(state.fed)
            if missing > max(budget, k + 2):
                if budget > 0 and self._reserve(state, len(state.fed) + budget - 1):
                    partial.append((request, state, budget))
                    budget = 0
                continue
            if not self._reserve(state, request.num_tokens + k - 1):
                continue
            budget = max(0, budget - missing)
            active.append((request, k, state))
        tokens: dict[str, list[int]] = {r.request_id: [] for r, _, _ in active}
        probs: dict[str, list[torch.Tensor]] = {r.request_id: [] for r, _, _ in active}
        # Pass 1 feeds what the draft has not seen; pass j > 1 feeds the (j-1)-th drafted token.
        depth = 1
        batch = [(r, s) for r, _, s in active]
        chunks = [TokenChunk(r.token_ids[len(s.fed):], len(s.fed), s.blocks) for r, s in batch]
        chunks += [TokenChunk(r.token_ids[len(s.fed):len(s.fed) + n], len(s.fed), s.blocks) for r, s, n in partial]
        while chunks:
            for chunk, state in zip(chunks, [s for _, s in batch] + [s for _, s, _ in partial]):
                state.fed.extend(chunk.token_ids)
            started = self.clock()
            logits = self.runner.last_logits(chunks)
            self._sample(batch, logits[:len(batch)], tokens, probs)
            if depth > 1:  # the first pass carries prompt tokens: not a per-depth cost
                elapsed = self.clock() - started
                self.depth_cost_s = elapsed if self.depth_cost_s == 0 else 0.8 * self.depth_cost_s + 0.2 * elapsed
            depth += 1
            batch = [(r, s) for r, k, s in active if k >= depth]
            chunks = [TokenChunk([tokens[r.request_id][-1]], len(s.fed), s.blocks) for r, s in batch]
            partial = []
        out = {}
        for request, _, _ in active:
            rows = probs[request.request_id]
            out[request.request_id] = Proposal(tokens[request.request_id],
                                               torch.stack(rows) if rows else None)
        return out

    # ---- internals ------------------------------------------------------------------------
    def _sync(self, request: Request) -> DraftState | None:
        """The request's state with drafted-but-rejected tokens rolled back, or None if it cannot draft."""
        state = self.states.get(request.request_id)
        if state is None:
            state = self.states[request.request_id] = DraftState()
            seed = request.sampling_params.seed
            if seed is not None:
                state.generator = torch.Generator(device=self.runner.device).manual_seed(seed + 7919)
        real = request.token_ids  # read in place: only the unverified tail is compared
        valid = state.verified
        end = min(len(state.fed), len(real))
        while valid < end and state.fed[valid] == real[valid]:
            valid += 1
        # Always feed at least the newest token: its logits predict the first draft.
        valid = min(valid, len(real) - 1)
        del state.fed[valid:]
        state.verified = valid
        return state

    def _reserve(self, state: DraftState, last_position: int) -> bool:
        if last_position >= self.max_len:
            return False
        need = last_position // self.block_size + 1 - len(state.blocks)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(0, need)):
            state.blocks.append(self.free_blocks.pop())
        return True

    def _sample(self, batch: list[tuple[Request, DraftState]], logits: torch.Tensor,
                tokens: dict[str, list[int]], probs: dict[str, list[torch.Tensor]]) -> None:
        greedy = [i for i, (r, _) in enumerate(batch) if r.sampling_params.greedy]
        if greedy:
            picks = logits[greedy].argmax(dim=-1).tolist()
            for i, token in zip(greedy, picks):
                tokens[batch[i][0].request_id].append(token)
        sampled = [i for i, (r, _) in enumerate(batch) if not r.sampling_params.greedy]
        if not sampled:
            return
        q = Sampler._probs([batch[i][0].sampling_params for i in sampled], logits[sampled].float())
        for row, i in enumerate(sampled):
            request, state = batch[i]
            gen = state.generator or self.generator
            token = int(draw(q[row:row + 1], gen)[0])
            tokens[request.request_id].append(token)
            probs[request.request_id].append(q[row])
