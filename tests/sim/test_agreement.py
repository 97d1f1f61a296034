"""The simulator makes the real engine's scheduling decisions, step by step.

A real EngineCore on builtin-tiny runs on a fake clock that each step advances by the profile's
cost of its plan; the simulator runs the same requests with the same profile. Every plan (which
requests, how many tokens each) and every preemption must be the same, in the same order.
"""
from __future__ import annotations

import pytest

from punctual.bench.arrivals import arrival_offsets
from punctual.bench.workloads import generate_workload
from punctual.config import EngineConfig
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.config import ClusterConfig
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import StepProfile

COEFFICIENTS = {"fixed": 0.01, "prefill_tokens": 3e-4, "decode_rows": 5e-4, "context_tokens": 2e-6,
                "attention_pairs": 1e-8, "sampled_rows": 1e-4}


def shape(plan):
    return [(s.request_id, s.num_new_tokens) for s in plan.scheduled], sorted(r.request_id for r in plan.preempted)


def engine_plans(config: EngineConfig, requests, offsets, profile: StepProfile) -> list:
    from punctual.engine.core import EngineCore

    now = [0.0]
    core = EngineCore(config, clock=lambda: now[0])
    plans = []
    execute = core.runner.execute

    def timed(plan):
        plans.append(shape(plan))
        output = execute(plan)
        now[0] += profile.step_seconds(plan)  # the step takes what the simulator will charge
        return output
    core.runner.execute = timed
    pending = list(zip(offsets, requests))
    while pending or core.has_unfinished_requests():
        if not core.has_unfinished_requests() and pending[0][0] > now[0]:
            now[0] = pending[0][0]  # idle until the next arrival
        while pending and pending[0][0] <= now[0]:
            arrival, request = pending.pop(0)
            core.add_request(EngineCoreRequest(f"1-{request.index}", list(request.prompt_token_ids),
                                               SamplingParams(max_tokens=request.output_len, ignore_eos=True,
                                                              temperature=0.0), arrival_time=arrival))
        core.step()
        core.check_integrity()
    return plans


def sim_plans(config: EngineConfig, requests, offsets, profile: StepProfile) -> list:
    plans = []

    class Recording(StepProfile):
        def step_seconds(self, plan, features=None):
            plans.append(shape(plan))
            return profile.step_seconds(plan, features)

    recording = Recording("linear", dict(COEFFICIENTS))
    sim = Simulator(SimConfig(config.scheduler, config.cache.num_kv_blocks, config.cache.block_size,
                                  config.cache.enable_prefix_caching, 1024), recording)
    outcomes, _ = sim.run(requests, offsets=offsets)
    assert all(o.error is None for o in outcomes)
    sim.replicas[0].scheduler.check_integrity()
    return plans


@pytest.mark.parametrize("workload, policy, rate, scale", [("chat", "fcfs", 40.0, 0.15),
                                                           ("shared-prefix", "sjf", 20.0, 0.05),
                                                           ("chat", "slo", float("inf"), 0.08)])
def test_plans_match_the_engine_step_by_step(workload, policy, rate, scale):
    # A small pool and budget: chunked prefills, prefix hits, preemptions and recomputation all happen.
    config = EngineConfig.from_kwargs("builtin-tiny", num_kv_blocks=28, block_size=4, max_num_seqs=6,
                                      max_num_batched_tokens=24, scheduling_policy=policy,
                                      default_ttft_slo_ms=400.0, default_tpot_slo_ms=40.0)
    # Synthetic words: their stand-in ids fall inside builtin-tiny's vocabulary.
    requests = to_sim_requests(generate_workload(workload, 12, 7, scale, text="synthetic"))
    offsets = arrival_offsets(len(requests), rate, seed=7)
    profile = StepProfile("linear", dict(COEFFICIENTS))
    expected = engine_plans(config, requests, offsets, profile)
    got = sim_plans(config, requests, offsets, profile)
    assert any(preempted for _, preempted in expected) or policy != "fcfs"
    assert got == expected
