"""The simulator's fast path (runs of repeated decode steps, priced and applied at once) gives
the answers of planning every step: the same token times for every request, the same replicas,
the same steps, cost models and KV state."""
from __future__ import annotations

import pytest

from punctual.bench.arrivals import arrival_offsets
from punctual.bench.workloads import generate_workload
from punctual.config import ClusterConfig, SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.request import EngineCoreRequest, Request
from punctual.sampling_params import SamplingParams
from punctual.sched.repeats import decode_run
from punctual.sched.scheduler import Scheduler
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import StepProfile
from punctual.sim.replica import SYNTHETIC_TOKEN, SimReplica
from punctual.sim.spread import quantile_table

COEFFICIENTS = {"fixed": 0.004, "prefill_tokens": 2e-5, "decode_rows": 2e-4, "context_tokens": 1e-7,
                "attention_pairs": 1e-10, "sampled_rows": 3e-5}


def _scheduler(num_requests: int, num_blocks: int) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), KVCacheManager(num_blocks, 4))
    for i in range(num_requests):
        params = SamplingParams(max_tokens=20 + 7 * i, ignore_eos=True, temperature=0.0)
        scheduler.add_request(Request(EngineCoreRequest(f"r{i}", list(range(1, 6 + 3 * i)), params), 1 << 20), 0.0)
    return scheduler


def _state(scheduler: Scheduler):
    return ([(r.request_id, list(r.token_ids), r.num_computed_tokens, r.status) for r in scheduler.running],
            scheduler.cost_model._sums, dict(scheduler.kv.block_tables), scheduler.kv.num_free_blocks,
            dict(scheduler.kv.indexed_blocks), dict(scheduler.kv.pool.cached))


@pytest.mark.parametrize("num_blocks", [64, 14])  # 14: too few for every request's blocks (a run stops short)
def test_a_decode_run_applies_the_step_by_step_calls(num_blocks):
    # Block size 4: the runs cross block boundaries (indexing, allocation, evicting cached blocks).
    step_by_step, repeated = _scheduler(3, num_blocks), _scheduler(3, num_blocks)
    now, seen_repeats = 0.0, 0
    for _ in range(80):
        plan = step_by_step.schedule(now)
        assert [(s.request_id, s.start_position) for s in plan.scheduled] == \
            [(s.request_id, s.start_position) for s in repeated.schedule(now).scheduled]
        if not plan.scheduled:
            break
        run = decode_run(repeated, plan, SYNTHETIC_TOKEN)
        steps = run.steps if run is not None else 0
        times = [now]
        for step in range(steps + 1):  # the plan and its repeats, one call at a time
            if step:
                again = step_by_step.schedule(times[-1])
                assert [(s.request_id, s.start_position) for s in again.scheduled] == \
                    [(s.request_id, s.start_position + step) for s in plan.scheduled]  # the plan, steps tokens on
                assert not again.preempted
                plan_now = again
            else:
                plan_now = plan
            times.append(times[-1] + 0.01 + 0.001 * step)
            step_by_step.record_step_time(plan_now, times[-1] - times[-2])
            updates = step_by_step.update_from_output(plan_now, _sampled(plan_now), times[-1])
            assert step == steps or all(reason is None for _, _, reason in updates)  # the repeats end nobody
            if run is not None and step < steps and step % 3 == 1:  # applied in goes: as the calls so far
                run.advance(2 * step + 1, times)  # up to this step's end
                run.settle()
                assert _state(repeated) == _state(step_by_step)
        last = plan
        if run is not None:
            run.advance(2 * steps, times)
            run.settle()
            last = repeated.schedule(times[-2])  # the last repeat, planned as usual (its blocks are there)
        repeated.record_step_time(last, times[-1] - times[-2])
        repeated.update_from_output(last, _sampled(last), times[-1])
        now = times[-1]
        seen_repeats += steps
        assert _state(repeated) == _state(step_by_step)
        repeated.check_integrity()
    assert seen_repeats > 20 and not step_by_step.requests  # runs happened, and everyone finished


def _sampled(plan):
    from punctual.plan import ModelRunnerOutput

    return ModelRunnerOutput({s.request_id: [SYNTHETIC_TOKEN] for s in plan.scheduled if s.samples})


def _run(router: str, repeat: bool, spread: bool, prefix_caching: bool = True):
    tables = {"step_ratio": quantile_table([0.8, 1.0, 1.3] * 10), "admit_s": quantile_table([0.001, 0.02] * 15)}
    profile = StepProfile("linear", dict(COEFFICIENTS), spread=tables if spread else None,
                          frontend={"deliver_s": 0.002, "deliver_per_stream_s": 1e-4})
    config = SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 90, block_size=8,
                       enable_prefix_caching=prefix_caching, max_model_len=2048,
                       cluster=ClusterConfig(replicas=3, router=router), repeat_decode_steps=repeat)
    sim = Simulator(config, profile)
    requests = to_sim_requests(generate_workload("shared-prefix", 40, 5, 0.15))
    answers = []
    for rate in (30.0, 200.0):  # the second run starts from the first's caches and clock; preempts
        outcomes, duration = sim.run(requests, offsets=arrival_offsets(len(requests), rate, seed=3))
        answers.append((sorted((o.request.index, o.replica, o.token_times, o.finished, o.error) for o in outcomes),
                        duration))
    for replica in sim.replicas:
        replica.scheduler.check_integrity()
    holders = {h: sorted(held) for h, held in sim.front.held_blocks().items()}
    return (answers, sim.now, sim.num_steps, holders, [(r.busy_s, r.step_s, r.scheduler.cost_model._sums, r.kv.num_free_blocks,
                                                r.scheduler.num_preemptions) for r in sim.replicas]), sim.num_events


@pytest.mark.parametrize("router, spread, prefix_caching, price_ahead",
                         [("cache_aware", True, True, 32), ("cache_aware", True, True, 2),
                          ("least_loaded", False, True, 3), ("round_robin", True, False, 32)])
def test_repeated_steps_give_the_step_by_step_answers(router, spread, prefix_caching, price_ahead, monkeypatch):
    monkeypatch.setattr("punctual.sim.replica.PRICE_AHEAD", price_ahead)  # runs longer than their first pricing
    exact, exact_events = _run(router, False, spread, prefix_caching)
    fast, fast_events = _run(router, True, spread, prefix_caching)
    assert all(error is None for *_, error in exact[0][0][0])
    assert fast == exact
    assert fast_events < exact_events * 0.7  # the fast path ran: fewer events than steps


def test_a_profile_that_prices_plans_itself_sees_every_plan():
    class Pricing(StepProfile):
        def step_seconds(self, plan, features=None):
            return 0.01

    sim = Simulator(SimConfig(SchedulerConfig(), 100), Pricing("linear", dict(COEFFICIENTS)))
    assert not any(isinstance(r, SimReplica) and r.repeat_steps for r in sim.replicas)


def test_observing_a_run_of_steps_at_once_gives_the_sums_of_one_call_per_step():
    from punctual.sched.cost_model import StepCostModel

    one_by_one, at_once = StepCostModel(), StepCostModel()
    for model in (one_by_one, at_once):
        model.observe(40, 3, 0.031, 3)  # a prefill before the run: the sums do not start at zero
    durations = [0.01 + 0.0007 * (i % 5) + 1e-9 * i for i in range(12)]  # fewer, then more than min_observations
    for seconds in durations[:5]:
        one_by_one.observe(6, 6, seconds, 6)
    at_once.observe_steps(6, 6, durations[:5], 6)
    assert at_once._sums == one_by_one._sums and at_once._stale == one_by_one._stale  # not yet fitted
    for seconds in durations[5:]:
        one_by_one.observe(6, 6, seconds, 6)
    at_once.observe_steps(6, 6, durations[5:], 6)
    at_once.observe_steps(6, 6, [], 6)  # nothing observed: nothing changes
    assert at_once._sums == one_by_one._sums and at_once.num_observations == one_by_one.num_observations == 13
    assert at_once.coefficients() == one_by_one.coefficients() != StepCostModel().coefficients()


def test_the_router_counts_a_runs_allocations_without_applying_them(monkeypatch):
    # least_loaded reads free blocks, not block events: an allocation in a run is told to it (the
    # free count it sees) without the replica applying it, and every answer stays the same.
    from punctual.sim.routing import FrontEnd

    told_only = []
    load = FrontEnd.load

    def counting_load(self, replica):
        told_only.append(replica.kv_blocks_free() != replica.kv.num_free_blocks)
        return load(self, replica)
    monkeypatch.setattr(FrontEnd, "load", counting_load)
    fast, _ = _run("least_loaded", True, True)
    assert any(told_only)
    monkeypatch.setattr(FrontEnd, "load", load)
    exact, _ = _run("least_loaded", False, True)
    assert fast == exact


def test_blocks_no_prompt_looks_up_wait_for_the_next_catch_up(monkeypatch):
    """Under cache_aware a run's block fills are applied before each routing decision only where
    some prompt of the run could look the block up: a request whose last full prompt block no
    prompt goes on from is sealed, and its fills wait. Some are sealed here, not all, and every
    answer (outcomes, clock, steps, the router's holders at the end) is the step-by-step one."""
    sealed = []
    original = SimReplica._sealed

    def recording(self, run):
        out = original(self, run)
        sealed.extend(out)
        return out
    monkeypatch.setattr(SimReplica, "_sealed", recording)
    fast, _ = _run("cache_aware", True, True)
    assert any(sealed) and not all(sealed)
    exact, _ = _run("cache_aware", False, True)
    assert fast == exact
