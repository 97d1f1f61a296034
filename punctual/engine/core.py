"""The engine core: the step loop schedule -> execute -> update. No HTTP, no asyncio, no text."""
from __future__ import annotations

import logging
import time
from typing import Callable

from punctual.config import EngineConfig
from punctual.engine.adapter_loads import AdapterLoads
from punctual.engine.messages import PinAck
from punctual.engine.stats import EngineStats
from punctual.kv.manager import KVCacheManager
from punctual.lora.request import LoRARequest, adapter_id_of
from punctual.runner.runner import ModelRunner
from punctual.runner.tensor_parallel import TensorParallelRunner
from punctual.plan import StepPlan
from punctual.request import EngineCoreOutput, EngineCoreRequest, MigratedRequest, Request, RequestStatus
from punctual.sampling_params import SamplingParams
from punctual.sched.scheduler import Scheduler
from punctual.spec_decode.speculator import Speculator
from punctual.structured.compiler import GrammarCompiler, GrammarWaitlist
from punctual.validation import PromptError, PromptLimits, check_logit_bias, check_prompt

__all__ = ["EngineCore", "EngineStats", "PinAck"]

logger = logging.getLogger(__name__)

# A step this long, and twice what the cost model expects, stalls every running stream for no
# reason the scheduler chose: say so in the log.
SLOW_STEP_S = 1.0


SPARSE_OFF = ("sparse_attention asked for, but this engine attends densely (start it with sparse_attention='quest', "
              "or --sparse-attention quest)")


class EngineCore:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        spec = config.speculative
        draft_bytes = 0
        if spec.enabled and spec.speculative_method == "draft":
            from punctual.spec_decode.draft import draft_kv_bytes_per_block  # only when asked

            draft_bytes = draft_kv_bytes_per_block(spec.speculative_model, config.model, config.cache)
        # Tensor parallel: rank 0's runner, which starts the other ranks and sends them every plan.
        runner_class = ModelRunner if config.model.tensor_parallel_size == 1 else TensorParallelRunner
        self.runner = runner_class(config.model, config.cache, config.scheduler.max_num_seqs, draft_bytes, config.lora)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = tuple(self.runner.arch.eos_token_ids)
        self.vocab_size = self.runner.arch.vocab_size
        self.kv_manager = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                         config.cache.enable_prefix_caching, self.runner.num_tier_slots,
                                         config.cache.prefix_caching_hash_algo)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager,
                                   PromptLimits(self.vocab_size, self.max_model_len),
                                   max_loras=config.lora.max_loras if config.lora.enable_lora else None)
        self.speculator = self._make_speculator() if spec.enabled else None
        if self.speculator is not None:
            self.scheduler.spec_lengths = self.speculator.choose_lengths
        self._pins_in_flight: dict[str, str] = {}  # internal request id -> pin id
        # KV arriving from other engines: its writes wait for the next plan, so none races a step.
        self._kv_writes: list[tuple[tuple[int, ...], object]] = []
        # Structured output: requests wait here, not in the scheduler, until their grammar compiles.
        self.grammars = GrammarWaitlist(GrammarCompiler(self._load_tokenizer, self.vocab_size, self.eos_token_ids))
        self.rejections: dict[str, str] = {}  # request id -> why it failed after it was accepted; the loop reports them
        # LoRA: with background_adapter_loads (the server's core process), a request whose adapter
        # is not loaded waits here while a thread reads it; else the read is inline (offline LLM).
        self.background_adapter_loads = False
        self.adapter_loads = (AdapterLoads(self.runner.read_adapter, self.runner.keep_adapter)
                              if self.runner.adapters is not None else None)
        self.lora_acks: list[PinAck] = []  # answers to load commands whose background read ended
        self.num_steps = 0
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0

    @property
    def prompt_limits(self) -> PromptLimits:
        return self.scheduler.prompt_limits

    def _make_speculator(self) -> Speculator:
        spec = self.config.speculative
        proposer = None
        if spec.speculative_method == "draft":
            from punctual.spec_decode.draft import DraftModelProposer

            proposer = DraftModelProposer(spec.speculative_model, self.runner, self.runner.num_blocks,
                                          self.config.scheduler.max_num_seqs, spec.num_speculative_tokens,
                                          clock=self.clock, seed=self.config.model.seed,
                                          catch_up_tokens=self.config.scheduler.max_num_batched_tokens)
        return Speculator(spec, self.scheduler.cost_model, self.config.scheduler.max_num_batched_tokens, proposer)

    def _load_tokenizer(self):
        from punctual.tokenizer import load_tokenizer

        return load_tokenizer(self.runner.model_path)

    def _release_compiled(self) -> None:
        """Queue requests whose grammar is ready; their matcher reaches the runner in the plan."""
        ready, failed = self.grammars.take()
        for request, matcher in ready:
            request.grammar = matcher
            self.scheduler.add_request(request, self.clock())
        self.rejections.update(failed)

    def _weigh_tier(self) -> None:
        """Use tier hits only while copying a block back is faster than recomputing its tokens."""
        restore = self.runner.tier_store.restore_s_per_block
        cost = self.scheduler.cost_model
        if restore > 0 and cost.num_observations >= cost.min_observations:
            self.kv_manager.restore_from_tier = restore < cost.coefficients()[1] * self.kv_manager.block_size

    # ---- intake -------------------------------------------------------------------------
    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Validate against the model's limits and queue; raises ValueError naming the problem."""
        check_prompt(core_request.prompt_token_ids, self.prompt_limits)
        lora = core_request.lora_request
        read_later = (lora is not None and self.background_adapter_loads and self.adapter_loads is not None
                      and lora.lora_int_id not in self.runner.adapters)
        if lora is not None and not read_later:
            self.runner.load_adapter(lora)  # read and checked now: a bad adapter is this request's error
        check_logit_bias(core_request.sampling_params.logit_bias, self.prompt_limits)
        if core_request.sampling_params.sparse_attention and self.config.model.sparse_attention is None:
            raise ValueError(SPARSE_OFF)
        request = self._new_request(core_request)
        if read_later:  # queued once its adapter is read (off the step loop); a bad one is rejected then
            self.adapter_loads.add_request(core_request.request_id, lora, request)
            return
        self._queue(request)

    def _queue(self, request: Request) -> None:
        if request.sampling_params.structured is not None:  # held until its grammar compiles (off the step loop)
            self.grammars.add(request.request_id, request.sampling_params.structured, request)
            return
        self.scheduler.add_request(request, self.clock())

    def _new_request(self, core_request: EngineCoreRequest) -> Request:
        """The core's state for a request, its stop tokens defaulting to the model's EOS ids (set
        before the Request is built: it derives its stop set from them)."""
        params = core_request.sampling_params
        if not params.eos_token_ids:
            params.eos_token_ids = self.eos_token_ids
        return Request(core_request, self.max_model_len)

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> PinAck:
        """Compute a prefix (one prefill, no output) and keep its full blocks cached until unpinned.

        The pin takes effect when its prefill finishes; `pinned_tokens(pin_id)` then tells how many
        tokens are held. Unpinning before that cancels the prefill. For a document a user knows
        will be reused (Prompt Cache's prompt modules). The pinned blocks serve only requests with
        the same `cache_salt`.
        """
        if pin_id in self.kv_manager.pins or pin_id in self._pins_in_flight.values():
            return PinAck(pin_id, False, 409, f"pin_id {pin_id!r} is already pinned")
        try:
            self.add_request(EngineCoreRequest(f"pin:{pin_id}", list(prompt_token_ids),
                                               SamplingParams(max_tokens=1, ignore_eos=True, temperature=0),
                                               arrival_time=self.clock(), cache_salt=cache_salt))
        except PromptError as exc:
            return PinAck(pin_id, False, 400, str(exc))
        self._pins_in_flight[f"pin:{pin_id}"] = pin_id
        return PinAck(pin_id, True, num_tokens=len(prompt_token_ids))

    def unpin_prefix(self, pin_id: str) -> PinAck:
        """Release a pin; one still being computed is cancelled (its blocks are freed at once)."""
        request_id = f"pin:{pin_id}"
        if self._pins_in_flight.get(request_id) == pin_id:
            del self._pins_in_flight[request_id]
            self.abort_requests([request_id])
            return PinAck(pin_id, True)
        if self.kv_manager.unpin(pin_id):
            return PinAck(pin_id, True)
        return PinAck(pin_id, False, 404, f"no pinned prefix {pin_id!r}")

    def load_lora(self, lora_request: LoRARequest) -> PinAck | None:
        """Load (and check) an adapter ahead of its requests: the answer says why not (a 400).
        None when the read went to the background: its answer comes later in `lora_acks`."""
        if (self.background_adapter_loads and self.adapter_loads is not None
                and lora_request.lora_int_id not in self.runner.adapters):
            try:
                self.adapter_loads.add_command(lora_request)
            except ValueError as exc:
                return PinAck(lora_request.lora_name, False, 400, str(exc))
            return None
        try:
            self.runner.load_adapter(lora_request)
        except ValueError as exc:
            return PinAck(lora_request.lora_name, False, 400, str(exc))
        return PinAck(lora_request.lora_name, True)

    def unload_lora(self, lora_int_id: int) -> PinAck:
        """Forget an adapter's weights; requests still running under it keep it loaded until they finish."""
        if self.runner.adapters is not None and lora_int_id not in self.scheduler.lora_running:
            self.runner.adapters.remove(lora_int_id)
        return PinAck(str(lora_int_id), True)

    def pinned_tokens(self, pin_id: str) -> int | None:
        blocks = self.kv_manager.pins.get(pin_id)
        return None if blocks is None else len(blocks) * self.kv_manager.block_size

    # ---- KV that moves between engines (disaggregated prefill, migration) ----------------
    def _check_kv_movable(self) -> None:
        if self.config.model.tensor_parallel_size > 1:  # rank 0 holds only its heads' KV
            raise ValueError("KV transfer between engines is not supported with tensor_parallel_size > 1")

    def export_kv(self, request_id: str, first_block: int = 0, last_block: int | None = None,
                  int8: bool = False):
        """Read blocks [first_block, last_block) of a running request's KV (default: up to its
        last full block of computed tokens), between steps. Returns the KVPayload."""
        self._check_kv_movable()
        from punctual.runner.kv_transfer import read_blocks

        request = self.scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            raise ValueError(f"request {request_id!r} is not running here")
        table = self.kv_manager.block_table(request_id)
        if last_block is None:
            last_block = self.scheduler.kv_tokens(request) // self.kv_manager.block_size
            if request.shareable_blocks is not None:  # attention sinks: only the sinks stay where they are
                last_block = min(last_block, request.shareable_blocks)
        return read_blocks(self.runner.kv_caches, table[first_block:last_block], int8)

    def migrate_out(self, request_id: str, first_block: int = 0, int8: bool = False):
        """The stop-and-copy end of a migration: detach the request (no output, blocks freed) and
        return its state and the KV of its blocks from `first_block` on (the rest was pre-copied)."""
        from punctual.runner.kv_transfer import read_blocks

        self._check_kv_movable()
        request = self.scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING or request.grammar is not None:
            raise ValueError(f"request {request_id!r} is not a running request that can move")
        num_blocks = self.kv_manager.blocks_for(self.scheduler.kv_tokens(request))
        payload = read_blocks(self.runner.kv_caches,
                              self.kv_manager.block_table(request_id)[first_block:num_blocks], int8)
        # The salt travels with it: the target indexes the moved blocks under the same chain.
        core_request = EngineCoreRequest(request_id, list(request.prompt_token_ids), request.sampling_params,
                                         request.arrival_time, request.priority, request.ttft_slo_ms,
                                         request.tpot_slo_ms, request.user, request.cache_salt, request.tenant,
                                         request.lora_request)
        state = MigratedRequest(core_request, request.output_token_ids, request.num_computed_tokens,
                                request.num_preemptions, request.num_evicted_tokens, request.first_token_time)
        self.scheduler.detach(request_id, self.clock())
        if self.speculator is not None:
            self.speculator.forget(request_id)
        return state, payload

    def reserve_import(self, request_id: str, num_blocks: int) -> bool:
        """Allocate blocks in advance for KV another engine is about to send."""
        self._check_kv_movable()
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        return self.kv_manager.reserve(request_id, num_blocks)

    def receive_kv(self, request_id: str, first_block: int, payload) -> None:
        """KV for blocks [first_block, first_block + payload.num_blocks) of a reserved request;
        written through the next step's plan."""
        if not self.kv_manager.reserve(request_id, first_block + payload.num_blocks):
            raise ValueError(f"no KV blocks free to receive {payload.num_blocks} blocks of {request_id!r}")
        table = self.kv_manager.block_table(request_id)
        self._kv_writes.append((tuple(table[first_block:first_block + payload.num_blocks]), payload))

    def commit_import(self, state: MigratedRequest, first_block: int = 0, payload=None) -> bool:
        """Go on with a request another engine let go: its KV is what was received, plus `payload`
        from `first_block` on. False, with its blocks released, if it cannot be taken now."""
        request_id = state.core_request.request_id
        request = self._new_request(state.core_request)
        for token_id in state.output_token_ids:
            request.append_token(token_id)
        request.num_computed_tokens = state.num_computed_tokens
        request.num_preemptions = state.num_preemptions
        request.num_evicted_tokens = state.num_evicted_tokens
        request.first_token_time = state.first_token_time
        num_kv_tokens = self.scheduler.kv_tokens(request)
        num_blocks = self.kv_manager.blocks_for(num_kv_tokens)
        if payload is not None:
            if first_block + payload.num_blocks != num_blocks:
                raise ValueError(f"{request_id!r}: blocks {first_block}..{first_block + payload.num_blocks} "
                                 f"do not end at the {num_blocks} its {num_kv_tokens} cached tokens fill")
            try:
                self.receive_kv(request_id, first_block, payload)
            except ValueError:
                self.abort_import(request_id)
                return False
        table = self.kv_manager.block_tables.get(request_id)
        if table is None or len(table) < num_blocks:
            self.abort_import(request_id)
            return False
        if not self.scheduler.add_running(request, self.clock()):
            self.abort_import(request_id)
            return False
        return True

    def abort_import(self, request_id: str) -> None:
        """Give up on KV being received (either side called the migration off): free its blocks."""
        if request_id in self.scheduler.requests:
            return  # committed already: it is a request like any other
        table = self.kv_manager.block_tables.get(request_id)
        if table is not None:
            dropped = set(table)
            self._kv_writes = [(blocks, p) for blocks, p in self._kv_writes if not dropped & set(blocks)]
        self.kv_manager.release_reservation(request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.grammars.discard(request_ids)
        if self.adapter_loads is not None:
            self.adapter_loads.discard(request_ids)
        for request in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED, self.clock()):
            self._pins_in_flight.pop(request.request_id, None)
            if self.speculator is not None:
                self.speculator.forget(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or len(self.grammars) > 0
                or (self.adapter_loads is not None and len(self.adapter_loads) > 0))

    def _release_adapters(self) -> None:
        """Queue requests whose adapter is now read; reject those whose adapter failed."""
        ready, failed, acks = self.adapter_loads.take()
        for request in ready:
            self._queue(request)
        self.rejections.update(failed)
        self.lora_acks.extend(acks)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        if self.adapter_loads is not None and len(self.adapter_loads):
            self._release_adapters()
        if len(self.grammars):
            self._release_compiled()
        spec = self.speculator
        offers = spec.available(self.scheduler.running) if spec is not None else None
        plan = self.scheduler.schedule(self.clock(), offers)
        plan.kv_copies = self.kv_manager.take_kv_copies()
        plan.kv_copies.writes, self._kv_writes = self._kv_writes, []
        if spec is not None:
            spec.fill(plan, self.scheduler.requests)  # a draft model drafts here: not the target's step time
        outputs = [self._final_output(r, [], None) for r in plan.rejected]
        if not (plan.scheduled or plan.kv_copies or plan.finished_request_ids):
            if len(self.grammars):  # only compiles to wait for: block briefly instead of spinning
                self.grammars.wait(0.005)
            elif self.adapter_loads is not None and len(self.adapter_loads):  # only adapter reads
                self.adapter_loads.wait(0.005)
            return outputs
        started = self.clock()
        output = self.runner.execute(plan)
        now = self.clock()
        if plan.kv_copies.swap_in:
            self._weigh_tier()
        if not plan.scheduled:
            return outputs
        self._record_step_time(plan, now - started)
        self.prompt_tokens_computed += plan.num_prompt_tokens
        prompt_logprobs = self._take_prompt_logprobs(plan, output)
        updates = self.scheduler.update_from_output(plan, output, now)
        self.num_steps += 1
        self.generation_tokens += sum(len(new_token_ids) for _, new_token_ids, _ in updates)
        if spec is not None:
            spec.record(plan, output)
        for request, new_token_ids, finish_reason in updates:
            scored = prompt_logprobs.pop(request.request_id, None)
            if finish_reason is not None and spec is not None:
                spec.forget(request.request_id)
            pin_id = self._pins_in_flight.pop(request.request_id, None)
            if pin_id is not None:
                # The prefix is computed and its blocks cached (now free): hold them. Internal, no output.
                self.kv_manager.pin(pin_id, request)
                continue
            first_token_time = None
            if request.first_token_time is None:
                request.first_token_time = first_token_time = now
            lps = output.logprobs.get(request.request_id)
            lps = lps[:len(new_token_ids)] if lps is not None else None
            if finish_reason is not None:
                out = self._final_output(request, new_token_ids, lps)
            else:
                out = EngineCoreOutput(request.request_id, new_token_ids, new_logprobs=lps)
            out.first_token_time = first_token_time
            out.prompt_logprobs = scored
            outputs.append(out)
        # Prompt chunks that sampled nothing yet still deliver their scores.
        outputs.extend(EngineCoreOutput(request_id, [], prompt_logprobs=scored)
                       for request_id, scored in prompt_logprobs.items())
        return outputs

    def _take_prompt_logprobs(self, plan: StepPlan, output) -> dict[str, list]:
        """The prompt scores this step computed, each position sent once (a recomputation after a
        preemption scores the same positions again), with None for the first prompt token."""
        taken = {}
        for item in plan.scheduled:
            scored = output.prompt_logprobs.get(item.request_id)
            request = self.scheduler.requests.get(item.request_id)
            if scored is None or request is None:
                continue
            first = item.start_position + 1  # the prompt position the first score is for
            lead = [None] if item.start_position == 0 and request.num_prompt_logprobs_sent == 0 else []
            skip = max(0, request.num_prompt_logprobs_sent - first)
            scored = lead + scored[skip:]
            if scored:
                request.num_prompt_logprobs_sent = max(request.num_prompt_logprobs_sent, 1) + len(scored) - len(lead)
                taken[item.request_id] = scored
        return taken

    def _record_step_time(self, plan: StepPlan, seconds: float) -> None:
        predicted = self.scheduler.cost_model.predict(plan.num_batched_tokens, len(plan.scheduled),
                                                      plan.num_sampled_rows)
        self.scheduler.record_step_time(plan, seconds)
        if seconds > max(SLOW_STEP_S, 2 * predicted):
            logger.warning("slow step: %.2f s for %d sequences, %d batched tokens (the cost model expected %.2f s)",
                           seconds, len(plan.scheduled), plan.num_batched_tokens, predicted)

    @staticmethod
    def _final_output(request: Request, new_token_ids: list[int], lps) -> EngineCoreOutput:
        return EngineCoreOutput(request.request_id, new_token_ids, finish_reason=request.status.value,
                                new_logprobs=lps, metrics=request.latency_metrics())

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
            **self._spec_stats(),
            **self._lora_stats())

    def _lora_stats(self) -> dict:
        adapters = self.runner.adapters
        if adapters is None:
            return {}
        return dict(lora_enabled=True, lora_adapters_loaded=len(adapters), lora_loads=adapters.num_loads,
                    lora_swaps=self.scheduler.num_lora_swaps, lora_running=self.scheduler.lora_running_by_name(),
                    lora_waiting_for_slot=self.scheduler.lora_waiting_for_slot(),
                    lora_adapters=sorted(adapter_id_of(i) for i in set(adapters.adapters) | set(self.scheduler.lora_slots)))

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

    def close(self) -> None:
        """Release what outlives a step: the other tensor-parallel ranks' processes."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def check_integrity(self) -> None:
        """Every stateful part's invariants; the core process runs it when idle with --check-integrity."""
        self.scheduler.check_integrity()
        assert set(self._pins_in_flight) <= set(self.scheduler.requests), "a pin in flight lost its request"
        held = {b for table in self.kv_manager.block_tables.values() for b in table}
        assert all(set(blocks) <= held for blocks, _ in self._kv_writes), "a KV write into blocks nobody holds"
        # The runner forgets a finished request with the next plan: until then it is pending.
        stale = set(self.runner.requests) - set(self.scheduler.requests) - set(self.scheduler.pending_finished_ids)
        assert not stale, f"runner state of requests the scheduler forgot: {sorted(stale)}"
