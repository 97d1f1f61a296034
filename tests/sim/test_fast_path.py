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
from punctual.sched.scheduler import Scheduler
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import StepProfile
from punctual.sim.replica import SYNTHETIC_TOKEN, SimReplica
from punctual.sim.spread import quantile_table

COEFFICIENTS = {"fixed": 0.004, "prefill_tokens": 2e-5, "decode_rows": 2e-4, "context_tokens": 1e-7,
                "attention_pairs": 1e-10, "sampled_rows": 3e-5}


def _scheduler(num_requests: int) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), KVCacheManager(64, 8))
    for i in range(num_requests):
        params = SamplingParams(max_tokens=9 + 5 * i, ignore_eos=True, temperature=0.0)
        scheduler.add_request(Request(EngineCoreRequest(f"r{i}", list(range(1, 6 + 3 * i)), params), 1 << 20), 0.0)
    return scheduler


def _state(scheduler: Scheduler):
    return ([(r.request_id, list(r.token_ids), r.num_computed_tokens, r.status) for r in scheduler.running],
            scheduler.cost_model._sums, dict(scheduler.kv.block_tables), scheduler.kv.num_free_blocks)


def test_repeated_steps_end_as_step_by_step_updates():
    step_by_step, repeated = _scheduler(3), _scheduler(3)
    now, seen_repeats = 0.0, 0
    for _ in range(60):
        plan = step_by_step.schedule(now)
        assert [s.request_id for s in plan.scheduled] == [s.request_id for s in repeated.schedule(now).scheduled]
        if not plan.scheduled:
            break
        repeats = repeated.repeatable_steps(plan, SYNTHETIC_TOKEN)
        assert repeats == step_by_step.repeatable_steps(plan, SYNTHETIC_TOKEN)
        seconds = [0.01 + 0.001 * k for k in range(repeats + 1)]
        for k, step_seconds in enumerate(seconds):  # the plan and its repeats, one at a time
            if k:
                again = step_by_step.schedule(now)
                assert [(s.request_id, s.start_position) for s in again.scheduled] == \
                    [(s.request_id, s.start_position + k) for s in plan.scheduled]  # the plan, k tokens on
                assert not again.preempted
                plan_k = again
            else:
                plan_k = plan
            step_by_step.record_step_time(plan_k, step_seconds)
            updates = step_by_step.update_from_output(plan_k, _sampled(plan_k), now)
            assert k == repeats or all(reason is None for _, _, reason in updates)  # the repeats end nobody
            now += step_seconds
        # The other one ends the plan and its repeats but the last in one go, then the last as usual.
        repeated.finish_repeated_steps(plan, SYNTHETIC_TOKEN, seconds[:-1])
        if repeats:
            last = repeated.schedule(now - seconds[-1])
            assert [(s.request_id, s.start_position) for s in last.scheduled] == \
                [(s.request_id, s.start_position + repeats) for s in plan.scheduled]
        else:
            last = plan
        repeated.record_step_time(last, seconds[-1])
        repeated.update_from_output(last, _sampled(last), now)
        seen_repeats += repeats
        assert _state(repeated) == _state(step_by_step)
        repeated.check_integrity()
    assert seen_repeats > 10 and not step_by_step.requests  # repeats happened, and everyone finished


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
    return (answers, sim.now, sim.num_steps, [(r.busy_s, r.step_s, r.scheduler.cost_model._sums, r.kv.num_free_blocks,
                                                r.scheduler.num_preemptions) for r in sim.replicas]), sim.num_events


@pytest.mark.parametrize("router, spread, prefix_caching", [("cache_aware", True, True), ("least_loaded", False, True),
                                                            ("round_robin", True, False)])
def test_repeated_steps_give_the_step_by_step_answers(router, spread, prefix_caching):
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
