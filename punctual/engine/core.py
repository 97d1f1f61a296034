"""The engine core: the step loop schedule -> execute -> update. No HTTP, no asyncio, no text."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from punctual.config import EngineConfig
from punctual.kv.manager import KVCacheManager
from punctual.model.runner import ModelRunner
from punctual.request import EngineCoreOutput, EngineCoreRequest, Request, RequestStatus
from punctual.sampling_params import SamplingParams
from punctual.sched.scheduler import Scheduler
from punctual.spec.speculator import Speculator
from punctual.structured.compiler import GrammarCompiler, GrammarWaitlist

logger = logging.getLogger(__name__)

# A step this long, and twice what the cost model expects, stalls every running stream for no
# reason the scheduler chose: say so in the log.
SLOW_STEP_S = 1.0


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    num_preemptions: int
    num_steps: int
    prompt_tokens_computed: int
    generation_tokens: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were cached
    prefix_cached_blocks: int = 0
    prefix_cache_evictions: int = 0
    prefix_cache_tier_hits: int = 0  # prompt tokens restored from the second tier
    kv_tier_blocks: int = 0  # blocks the second tier holds
    kv_tier_stored: int = 0  # blocks copied out to the tier
    kv_tier_restored: int = 0  # blocks copied back from the tier
    spec_method: str | None = None  # speculative decoding: proposer name, tokens proposed/accepted
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0
    # sjf: Spearman rank correlation of predicted vs actual output lengths (None: not sjf, or too few yet)
    output_length_rank_correlation: float | None = None

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config.model, config.cache, config.scheduler.max_num_seqs)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = tuple(self.runner.arch.eos_token_ids)
        self.vocab_size = self.runner.arch.vocab_size
        self.kv_manager = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                         config.cache.enable_prefix_caching, self.runner.num_tier_slots)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager)
        self.speculator = self._make_speculator() if config.speculative.enabled else None
        self._pins_in_flight: dict[str, str] = {}  # internal request id -> pin id
        # Structured output: requests wait here, not in the scheduler, until their grammar compiles.
        self.grammars = GrammarWaitlist(GrammarCompiler(self._load_tokenizer, self.vocab_size, self.eos_token_ids))
        self.grammar_rejections: dict[str, str] = {}  # request id -> why its grammar failed; the loop reports them
        self.num_steps = 0
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0

    def _make_speculator(self) -> Speculator:
        spec = self.config.speculative
        proposer = None
        if spec.speculative_method == "draft":
            from punctual.spec.draft import DraftModelProposer  # loads a second model: only when asked

            proposer = DraftModelProposer(spec.speculative_model, self.runner, self.config.scheduler.max_num_seqs,
                                          spec.num_speculative_tokens, seed=self.config.model.seed,
                                          catch_up_tokens=self.config.scheduler.max_num_batched_tokens)
        return Speculator(spec, self.scheduler, proposer)

    def _load_tokenizer(self):
        from punctual.tokenizer import load_tokenizer

        return load_tokenizer(self.runner.model_path)

    def _release_compiled(self) -> None:
        """Hand requests whose grammar is ready to the runner (their matcher) and the scheduler."""
        ready, failed = self.grammars.take()
        for request, matcher in ready:
            self.runner.guide.start(request.request_id, matcher)
            self.scheduler.add_request(request)
        self.grammar_rejections.update(failed)

    def _weigh_tier(self) -> None:
        """Use tier hits only while copying a block back is faster than recomputing its tokens."""
        restore = self.runner.tier_store.restore_s_per_block
        cost = self.scheduler.cost_model
        if restore > 0 and cost.num_observations >= cost.min_observations:
            self.kv_manager.restore_from_tier = restore < cost.per_token_s * self.kv_manager.block_size

    # ---- intake -------------------------------------------------------------------------
    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Validate against the model's limits and queue; raises ValueError naming the problem."""
        prompt = core_request.prompt_token_ids
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context window is {self.max_model_len} "
                             "tokens and must leave room for at least one generated token")
        params = core_request.sampling_params
        if not params.eos_token_ids:
            params.eos_token_ids = self.eos_token_ids
        if params.structured is not None:  # held until its grammar compiles (off the step loop)
            self.grammars.add(core_request.request_id, params.structured, Request(core_request, self.max_model_len))
            return
        self.scheduler.add_request(Request(core_request, self.max_model_len))

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int]) -> None:
        """Compute a prefix (one prefill, no output) and keep its full blocks cached until unpinned.

        The pin takes effect when its prefill finishes; `pinned_tokens(pin_id)` then tells how many
        tokens are held. For a document a user knows will be reused (Prompt Cache's prompt modules).
        """
        if pin_id in self.kv_manager.pins or pin_id in self._pins_in_flight:
            raise ValueError(f"pin_id {pin_id!r} is already pinned")
        request_id = f"pin:{pin_id}"
        # One extra token so that every token of the prefix is computed, the last one included.
        self.add_request(EngineCoreRequest(request_id, list(prompt_token_ids) + [0],
                                           SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)))
        self._pins_in_flight[request_id] = pin_id

    def unpin_prefix(self, pin_id: str) -> bool:
        return self.kv_manager.unpin(pin_id)

    def pinned_tokens(self, pin_id: str) -> int | None:
        blocks = self.kv_manager.pins.get(pin_id)
        return None if blocks is None else len(blocks) * self.kv_manager.block_size

    def abort_requests(self, request_ids: list[str]) -> None:
        self.grammars.discard(request_ids)
        for request in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
            self._forget(request.request_id)

    def _forget(self, request_id: str) -> None:
        self.runner.forget(request_id)
        if self.speculator is not None:
            self.speculator.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or len(self.grammars) > 0

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        if len(self.grammars):
            self._release_compiled()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler)
        # Timed from here: the cost model learns the target's step, not the draft model's.
        started = time.monotonic()
        plan = self.scheduler.schedule(started)
        transfers = self.kv_manager.take_tier_transfers()
        if transfers:
            # Evicted blocks are saved before this step overwrites them; tier hits are filled in.
            self.runner.transfer_tier(transfers)
            self._weigh_tier()
        outputs = [self._final_output(r, [], None) for r in plan.rejected]
        if not plan.scheduled:
            if len(self.grammars):  # only compiles to wait for: block briefly instead of spinning
                self.grammars.wait(0.005)
            return outputs
        predicted = self.scheduler.cost_model.predict(plan.num_batched_tokens, len(plan.scheduled),
                                                      plan.num_sampled_rows)
        sampled, logprobs = self.runner.execute(plan)
        now = time.monotonic()
        self.scheduler.record_step_time(plan, now - started)
        if now - started > max(SLOW_STEP_S, 2 * predicted):
            logger.warning("slow step: %.2f s for %d sequences, %d batched tokens (the cost model expected %.2f s)",
                           now - started, len(plan.scheduled), plan.num_batched_tokens, predicted)
        for item in plan.scheduled:
            is_decode = item.num_new_tokens == 1 and item.samples and item.request.num_output_tokens > 0
            if not is_decode:  # prompt chunks, and recomputation after a preemption
                self.prompt_tokens_computed += item.num_new_tokens
        updates = self.scheduler.update_from_output(plan, sampled, now)
        self.num_steps += 1
        self.generation_tokens += sum(len(u.new_token_ids) for u in updates)
        if self.speculator is not None:
            self.speculator.record(plan, sampled)
        for update in updates:
            request = update.request
            pin_id = self._pins_in_flight.pop(request.request_id, None)
            if pin_id is not None:
                # The prefix is computed and its blocks cached (now free): hold them. Internal, no output.
                self.kv_manager.pin(pin_id, request)
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            lps = logprobs.get(request.request_id)
            lps = lps[:len(update.new_token_ids)] if lps is not None else None
            if update.finish_reason is not None:
                self._forget(request.request_id)
                outputs.append(self._final_output(request, update.new_token_ids, lps))
            else:
                outputs.append(EngineCoreOutput(
                    request_id=request.request_id, new_token_ids=update.new_token_ids, new_logprobs=lps,
                    num_prompt_tokens=request.num_prompt_tokens, first_token_time=request.first_token_time,
                    arrival_time=request.arrival_time))
        return outputs

    @staticmethod
    def _final_output(request: Request, new_token_ids: list[int], lps) -> EngineCoreOutput:
        return EngineCoreOutput(
            request_id=request.request_id, new_token_ids=new_token_ids, finish_reason=request.status.value,
            new_logprobs=lps, num_prompt_tokens=request.num_prompt_tokens,
            first_token_time=request.first_token_time, arrival_time=request.arrival_time,
            metrics=request.latency_metrics())

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=self.kv_manager.num_blocks, kv_blocks_used=self.kv_manager.num_used_blocks,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            prompt_tokens_computed=self.prompt_tokens_computed, generation_tokens=self.generation_tokens,
            prefix_cache_queries=self.kv_manager.prefix_queries, prefix_cache_hits=self.kv_manager.prefix_hits,
            prefix_cached_blocks=self.kv_manager.pool.num_cached_blocks,
            prefix_cache_evictions=self.kv_manager.pool.num_evictions,
            prefix_cache_tier_hits=self.kv_manager.prefix_tier_hits,
            output_length_rank_correlation=self._rank_correlation(),
            **self._tier_stats(),
            **self._spec_stats())

    def _rank_correlation(self) -> float | None:
        predictor = getattr(self.scheduler.policy, "predictor", None)
        return None if predictor is None else predictor.rank_correlation()

    def _tier_stats(self) -> dict:
        tier = self.kv_manager.tier
        if tier is None:
            return {}
        return dict(kv_tier_blocks=len(tier), kv_tier_stored=tier.num_stored, kv_tier_restored=tier.num_restored)

    def _spec_stats(self) -> dict:
        if self.speculator is None:
            return {}
        spec = self.speculator.stats
        return dict(spec_method=spec.method, spec_proposed_tokens=spec.num_proposed_tokens,
                    spec_accepted_tokens=spec.num_accepted_tokens, spec_verifications=spec.num_verifications)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
