"""One simulated replica: the shipped scheduler and KV manager, with the model runner replaced
by the profile's step cost and synthetic sampled tokens.

Drives the scheduler exactly as `punctual.engine.core.EngineCore.step` does: schedule at the
step's start, charge the plan's cost, then `update_from_output` and `record_step_time` at its
end. Generation stops by the scheduler's own logic: requests carry `max_tokens` with
`ignore_eos`, as the real bench sends them, so every synthetic token is as good as any other.
"""
from __future__ import annotations

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.plan import ModelRunnerOutput, StepPlan
from punctual.request import Request
from punctual.sched.scheduler import FinishedUpdate, Scheduler
from punctual.sim.lora import AdapterSlots, SimLoRA
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
                 spread_seed: int = 0, lora: SimLoRA | None = None):
        self.replica_id = replica_id
        self.kv = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching)
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
        """Plan a step at `now`: (its duration, or None if nothing runs; requests the policy shed)."""
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
        return seconds, rejected

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
