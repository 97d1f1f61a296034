"""One simulated replica: the shipped scheduler and KV manager, with the model runner replaced
by the profile's step cost and synthetic sampled tokens.

Drives the scheduler exactly as `punctual.engine.core.EngineCore.step` does: schedule at the
step's start, charge the plan's cost, then `update_from_output` and `record_step_time` at its
end. Generation stops by the scheduler's own logic: requests carry `max_tokens` with
`ignore_eos`, as the real bench sends them, so every synthetic token is as good as any other.
"""
from __future__ import annotations

from bisect import bisect_left

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.plan import ModelRunnerOutput, StepPlan
from punctual.request import Request
from punctual.sched.scheduler import FinishedUpdate, Scheduler
from punctual.sim.profile import StepProfile, plan_features
from punctual.sim.spread import draw, step_stream
from punctual.validation import PromptLimits

SYNTHETIC_TOKEN = 1  # every sampled token; requests stop at max_tokens (ignore_eos), not on content
SAMPLED = (SYNTHETIC_TOKEN,)


def _ignore(replica_id: int) -> None:
    pass


class SimReplica:
    def __init__(self, replica_id: int, scheduler_config: SchedulerConfig, num_kv_blocks: int, block_size: int,
                 profile: StepProfile, enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 spread_seed: int = 0):
        self.replica_id = replica_id
        self.kv = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.kv, PromptLimits(None, max_model_len))
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
        self.run_times: list[float] | None = None  # the run's steps' starts, then its last step's end
        self._draws_state = None  # the step draws' state after the run's first step, for a cut
        self.step_seq = 0  # the simulator's event for the end of the step (or run) in flight

    @property
    def busy(self) -> bool:
        return self.plan is not None

    def add_request(self, request: Request, now: float) -> None:
        self.scheduler.add_request(request, now)

    def start_step(self, now: float) -> tuple[float | None, list[Request]]:
        """Plan a step at `now`: (when it ends, or None if nothing runs; requests the policy shed).
        With `repeat_steps`, the step and the repeats of it that follow form a run, and the time
        is when the run's last step ends."""
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
        end = now + seconds
        if self.repeat_steps and not rejected:
            repeats = self.scheduler.repeatable_steps(plan, SYNTHETIC_TOKEN)
            if repeats:
                end = self._price_repeats(features, now, end, repeats)
        return end, rejected

    def _price_repeats(self, features: tuple[float, ...], now: float, end: float, repeats: int) -> float:
        """Each repeat's price as start_step would charge it (its context one token longer per
        step, its spread drawn in turn); returns the run's end."""
        _, _, decodes, context, pairs, rows = features
        predict, ratios = self.profile.predict, self.profile.step_ratios
        if ratios is not None:
            self._draws_state = self.step_draws.getstate()
            random = self.step_draws.random
        times = [now, end]
        for step in range(1, repeats + 1):  # whole numbers in floats: the sums are exact
            seconds = predict((1.0, 0.0, decodes, context + decodes * step, pairs + decodes * step, rows))
            if ratios is not None:
                seconds *= draw(ratios, random())
            end = end + seconds
            times.append(end)
        self.run_times = times
        return end

    def step_in_flight(self, now: float) -> int:
        """The run's step in flight at `now` (the last one started before it)."""
        return bisect_left(self.run_times, now, 0, len(self.run_times) - 1) - 1

    def end_repeats(self, last: int) -> list[float]:
        """The run's steps before step `last` ended quietly: end them and plan step `last`, as
        step-by-step planning would have; the run is over (step `last` is the step in flight).
        Returns the ended steps' end times."""
        times, plan = self.run_times, self.plan
        self.run_times = None
        ends = times[1:last + 1]
        seconds = [end - start for start, end in zip(times, ends)]  # as finish_step: now - step_started
        self.scheduler.finish_repeated_steps(plan, SYNTHETIC_TOKEN, seconds)
        self.num_steps += last
        for step_seconds in seconds:
            self.busy_s += step_seconds
        if last < len(times) - 2 and self._draws_state is not None:  # cut short: the later draws are not taken
            self.step_draws.setstate(self._draws_state)
            for _ in range(last):
                self.step_draws.random()
        self._draws_state = None
        if last:
            self.plan = self.scheduler.schedule(times[last])
            self.step_started = times[last]
            assert len(self.plan.scheduled) == len(plan.scheduled) and not self.plan.preempted, "a repeat differed"
        return ends

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
