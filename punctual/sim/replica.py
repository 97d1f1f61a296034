"""One simulated replica: the shipped scheduler and KV manager, with the model runner replaced
by the profile's step cost and synthetic sampled tokens.

Drives the scheduler exactly as `punctual.engine.core.EngineCore.step` does: schedule at the
step's start, charge the plan's cost, then `update_from_output` and `record_step_time` at its
end. Generation stops by the scheduler's own logic: requests carry `max_tokens` with
`ignore_eos`, as the real bench sends them, so every synthetic token is as good as any other.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.plan import ModelRunnerOutput, StepPlan
from punctual.request import Request
from punctual.sched.repeats import DecodeRun, decode_run, truncated
from punctual.sched.scheduler import FinishedUpdate, Scheduler
from punctual.sim.lora import AdapterSlots, SimLoRA
from punctual.sim.profile import StepProfile, plan_features
from punctual.sim.spread import draw, step_stream
from punctual.validation import PromptLimits

SYNTHETIC_TOKEN = 1  # every sampled token; requests stop at max_tokens (ignore_eos), not on content
SAMPLED = (SYNTHETIC_TOKEN,)
PRICE_AHEAD = 32  # a run's repeats priced at a time: an arrival that cuts it wastes those priced past it


def _ignore(replica_id: int) -> None:
    pass


class SimReplica:
    def __init__(self, replica_id: int, scheduler_config: SchedulerConfig, num_kv_blocks: int, block_size: int,
                 profile: StepProfile, enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 spread_seed: int = 0, lora: SimLoRA | None = None, hash_algo: str = "sha256"):
        self.replica_id = replica_id
        self.kv = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching, hash_algo=hash_algo)
        self.scheduler = Scheduler(scheduler_config, self.kv, PromptLimits(None, max_model_len),
                                   max_loras=None if lora is None else lora.max_loras)
        self.lora = None if lora is None else AdapterSlots(lora)
        self.profile = profile
        self.max_model_len = max_model_len if max_model_len is not None else 1 << 30
        self.plan: StepPlan | None = None  # the step in flight
        self.step_started = 0.0
        self.num_steps = 0
        self.busy_s = 0.0  # virtual seconds spent in steps
        # The front end's count of this replica's requests (ClusterClient._loads, the router's load
        # signal): running (first token back), waiting, their queued prompt tokens, and their ids.
        self.front_running = self.front_waiting = self.front_queued = 0
        self.front_ids: set[str] = set()
        self.on_change = _ignore  # told the replica id whenever its load (counts, KV) may have moved
        self.step_s: float | None = None  # its step time as the front end sees it (migration.observe_step_gap)
        self.last_output_at: float | None = None
        self.role = "mixed"  # mixed | prefill | decode (prefill/decode disaggregation)
        self.pending_moves: list[tuple] = []  # KV moves out that wait for the step in flight to end
        self.step_draws = step_stream(replica_id, spread_seed)  # with a profile's spread: each step's ratio to its price
        self.step_sampled_rows = 0.0
        # Runs of repeated decode steps (Scheduler.repeatable_steps): priced at once, and planned and
        # ended in one go when the run ends or something reaches the scheduler. Set by the Simulator
        # where nothing else reads the replica's scheduler between its steps.
        self.repeat_steps = False
        self.run: DecodeRun | None = None
        self.run_times: list[float] | None = None  # the run's steps' starts, then its last step's end
        self.run_outcomes: list = []  # the simulator's outcomes of the run's requests, in plan order
        # When the run's ended steps delivered their tokens (not yet handed over): doubles, copied
        # into each request's token times at once (Outcome.token_times).
        self.run_delivered = array("d")
        self.run_serial = 0  # which run this is (the simulator's queue of run ops the router sees)
        self.visible_queued = False  # the simulator holds this run's next op that the router sees
        self._run_features: tuple[float, ...] = ()
        self._draws_state = None  # the step draws' state after the run's first step, for a cut
        self.step_seq = 0  # the simulator's event for the end of the step (or run) in flight
        # What the router sees of a run (set by the Simulator): with `router_reads_blocks` (it takes
        # the prefix cache's block events), the ops that index blocks and those whose allocation
        # evicts a cached block must be applied before it decides; an allocation otherwise changes
        # only the free-block count, which the router is told (`told`: ops counted in it, applied
        # or not) without applying it.
        self.router_reads_blocks = True
        self.watched_ops: list[int] = []  # the run's ops that change what the router sees, in order
        self.apply_ops: set[int] = set()  # of those, the ones applied before it decides
        self.told = 0
        # What this run's prompts look up (set by the Simulator per run, as ints: Python's hash of
        # each block hash; None: every block may be looked up). `lookup_hashes`: every block hash in
        # some prompt's lookup chain; `lookup_parents`: those some chain goes on from. Indexing or
        # evicting a block whose hash no lookup reaches changes nothing a routing decision reads,
        # so such ops wait for the replica's next catch-up instead of running before each
        # decision. A request whose last full prompt block is not a parent is sealed: every block
        # with an output token has such a hash (a chain that matched one would have matched its
        # parent first), though the hash itself is not known before the tokens exist.
        self.lookup_hashes: set | None = None
        self.lookup_parents: set | None = None
        self.untold_blocks: set = set()  # cached here, held back from the router (FrontEnd._watch)

    @property
    def busy(self) -> bool:
        return self.plan is not None

    @property
    def adapters(self) -> frozenset[str]:
        """The LoRA adapters it holds, as its stats report them to the router."""
        return frozenset() if self.lora is None else self.lora.held(self.scheduler.lora_slots)

    def add_request(self, request: Request, now: float) -> None:
        self.scheduler.add_request(request, now)

    def start_step(self, now: float) -> tuple[float | None, list[Request]]:
        """Plan a step at `now`: (when it ends, or None if nothing runs; requests the policy shed).
        With `repeat_steps`, the step and the repeats of it that follow form a run, and the time
        is when the run's last step ends."""
        slotted_before = list(self.scheduler.lora_slots) if self.lora is not None else None
        plan = self.scheduler.schedule(now)
        rejected = plan.rejected
        if not plan.scheduled:
            return None, rejected
        self.plan, self.step_started = plan, now
        features = plan_features(plan)
        self.on_change(self.replica_id)  # its KV blocks moved
        self.step_sampled_rows = features[5]  # the streams whose tokens the front end delivers after it
        seconds = self.profile.step_seconds(plan, features)
        ratios = self.profile.step_ratios
        if ratios is not None:
            seconds *= draw(ratios, self.step_draws.random())
        if self.lora is not None:
            requests = self.scheduler.requests
            step_adapters = {}
            for item in plan.scheduled:
                lora = requests[item.request_id].lora_request
                if lora is not None:
                    step_adapters[lora.lora_int_id] = lora
            seconds += self.lora.step_cost(slotted_before, self.scheduler.lora_slots, step_adapters)
        end = now + seconds
        self.run = None
        if self.repeat_steps and not rejected:
            run = decode_run(self.scheduler, plan, SYNTHETIC_TOKEN)
            if run is not None:
                end = self._price_repeats(run, features, now, end)
        return end, rejected

    def _price_repeats(self, run: DecodeRun, features: tuple[float, ...], now: float, end: float) -> float:
        """Start the run: its first repeats priced; returns when the last priced one ends."""
        if self.profile.step_ratios is not None:
            self._draws_state = self.step_draws.getstate()
        self.run, self.run_times, self._run_features = run, [now, end], features
        self.run_serial += 1
        self.told = 0
        if self.router_reads_blocks:
            # The k-th block the run allocates is the k-th free block now (nothing is freed in a run).
            hashes = self.kv.pool.block_hash
            taken = self.kv.pool.next_free(len(run.alloc_ops))
            if self.lookup_parents is None:
                self.watched_ops = run.visible_ops
                self.apply_ops = {2 * step for step in run.fills}
                self.apply_ops.update(op for op, block in zip(run.alloc_ops, taken) if hashes[block] is not None)
            else:
                sealed = self._sealed(run)
                looked_up = self.lookup_hashes
                self.apply_ops = {2 * step for step, indices in run.fills.items()
                                  if not all(sealed[i] for i in indices)}
                self.apply_ops.update(op for op, block in zip(run.alloc_ops, taken)
                                      if hashes[block] is not None and hash(hashes[block]) in looked_up)
                # Sealed fills change neither the free count nor anything looked up: not watched.
                self.watched_ops = sorted(self.apply_ops.union(run.alloc_ops))
        else:
            self.watched_ops = sorted(set(run.alloc_ops))
            self.apply_ops = set()
        if not self.price_more():
            self.run = self.run_times = self._draws_state = None
        return self.run_times[-1] if self.run is not None else end

    def _sealed(self, run: DecodeRun) -> list[bool]:
        """Which of the run's requests are sealed (see `lookup_parents`)."""
        kv, parents = self.kv, self.lookup_parents
        block_size = kv.block_size
        out = []
        for request in run.requests:
            first = request.num_prompt_tokens // block_size  # the first block with an output token
            out.append(first > 0 and request.cache_salt is None and request.lora_request is None
                       and hash(kv.block_hashes(request, first * block_size)[first - 1]) not in parents)
        return out

    def kv_blocks_free(self) -> int:
        """Free KV blocks as the router sees them: those of the run's allocations it was told of
        (`told`) are taken, applied or not."""
        free = self.kv.num_free_blocks
        run = self.run
        if run is not None and self.told > run.done:
            free -= run.blocks_taken(run.done, self.told)
        return free

    def price_more(self) -> bool:
        """Price the run's next repeats (PRICE_AHEAD at most) as start_step would charge each
        (its context one token longer per step, its spread drawn in turn); False if none was left."""
        run, times = self.run, self.run_times
        _, _, decodes, context, pairs, rows = self._run_features
        predict, ratios = self.profile.predict, self.profile.step_ratios
        random = self.step_draws.random
        priced = len(times) - 2
        end = times[-1]
        for step in range(priced + 1, min(run.steps, priced + PRICE_AHEAD) + 1):  # whole numbers in floats: exact
            seconds = predict((1.0, 0.0, decodes, context + decodes * step, pairs + decodes * step, rows))
            if ratios is not None:
                seconds *= draw(ratios, random())
            if not seconds > 0:  # a step that takes no time would end before its instant's arrivals
                truncated(run, step - 1)
                self._rewind_draws(step - 1)
                break
            end = end + seconds
            times.append(end)
        return len(times) - 2 > priced

    def _rewind_draws(self, started: int) -> None:
        """The run's draws as if only its first `started` repeats had started."""
        if self._draws_state is not None:
            self.step_draws.setstate(self._draws_state)
            for _ in range(started):
                self.step_draws.random()

    def ops_by(self, now: float) -> int:
        """How many of the run's priced ops happened by `now` (steps end before an instant's
        arrivals and start after them)."""
        times = self.run_times
        steps = len(times) - 2  # priced so far
        return bisect_right(times, now, 1, steps + 1) - 1 + bisect_left(times, now, 1, steps + 1) - 1

    def catch_up(self, now: float, every: bool = False) -> range:
        """Apply the run's ops that happened by `now` (steps end before an instant's arrivals,
        start after them), or `every` op; returns the steps that ended."""
        run, times = self.run, self.run_times
        ops = 2 * (len(times) - 2) if every else self.ops_by(now)
        first = run.ends_done
        if ops <= run.done:
            return range(first, first)
        run.advance(ops, times)
        ended = range(first, run.ends_done)
        for step in ended:
            self.busy_s += times[step + 1] - times[step]  # as finish_step: now - step_started
        self.num_steps += len(ended)
        return ended

    def end_run(self) -> float | None:
        """The run stops where its applied ops left it: plan the step in flight as schedule()
        would have at its start (its blocks are allocated already) and return when it ends, or
        None when the last step ended and the next is not planned yet."""
        run, times = self.run, self.run_times
        self.run = self.run_times = None
        run.settle()
        if run.done % 2:  # the step ended at this instant; the next one starts after its arrivals
            self._rewind_draws(run.ends_done - 1)
            self._draws_state = None
            self.plan = None
            return None
        step = run.done // 2  # started, not ended
        if step < run.steps:
            self._rewind_draws(step)
        self._draws_state = None
        if step:
            plan = self.scheduler.schedule(times[step])
            assert len(plan.scheduled) == len(run.requests) and not plan.preempted, "a repeat differed"
            self.plan, self.step_started = plan, times[step]
        return times[step + 1]

    def finish_step(self, now: float) -> list[FinishedUpdate]:
        plan, self.plan = self.plan, None
        seconds = now - self.step_started
        sampled = SAMPLED  # one list for all: the scheduler only reads it
        output = ModelRunnerOutput({item.request_id: sampled for item in plan.scheduled if item.samples})
        self.scheduler.record_step_time(plan, seconds)  # the policies' online cost model learns, as in the engine
        self.num_steps += 1
        self.busy_s += seconds
        self.on_change(self.replica_id)
        return self.scheduler.update_from_output(plan, output, now)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()
