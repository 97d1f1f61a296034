"""Scheduler mechanism on hand-built requests: no model, no torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.plan import ModelRunnerOutput
from punctual.request import EngineCoreRequest, Request, RequestStatus
from punctual.sampling_params import SamplingParams
from punctual.sched.scheduler import Scheduler


def make_request(rid: str, prompt_len: int, max_tokens: int = 100, arrival: float = 0.0, priority: int = 0):
    core = EngineCoreRequest(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens,
                             ignore_eos=True), arrival_time=arrival, priority=priority)
    return Request(core, max_model_len=10_000)


def make_scheduler(num_blocks=1000, block_size=16, budget=64, max_seqs=64, policy="fcfs"):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     scheduling_policy=policy), kv)


def step(sched: Scheduler, token: int = 7):
    """Plan a step and pretend the model sampled `token` wherever a chunk completed."""
    plan = sched.schedule(0.0)
    sampled = {s.request_id: [token] for s in plan.scheduled if s.samples}
    sched.update_from_output(plan, ModelRunnerOutput(sampled), 0.0)
    sched.check_integrity()
    return plan


def test_scheduler_does_not_import_torch():
    code = ("import sys, punctual.sched.scheduler, punctual.sched.policies, punctual.kv.manager; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_prompt_never_pauses_running_decodes():
    sched = make_scheduler(budget=32)
    for i in range(4):
        sched.add_request(make_request(f"d{i}", 5, arrival=i), now=0.0)
    step(sched)  # all four prefill in one step (20 tokens)
    assert all(r.num_output_tokens == 1 for r in sched.running)
    sched.add_request(make_request("long", 500, arrival=10), now=0.0)
    for _ in range(10):
        plan = step(sched)
        by_id = {s.request_id: s.num_new_tokens for s in plan.scheduled}
        # Every decode runs every step; the long prompt gets what is left of the budget.
        assert all(by_id[f"d{i}"] == 1 for i in range(4))
        assert by_id["long"] == 32 - 4
        assert plan.num_batched_tokens <= 32


def test_chunked_prefill_then_decode_uses_one_token_per_step():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 40, max_tokens=3), now=0.0)
    chunks = [step(sched).scheduled[0].num_new_tokens for _ in range(5)]
    assert chunks == [16, 16, 8, 1, 1]
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_used_blocks == 0


def test_max_num_seqs_bounds_the_running_set():
    sched = make_scheduler(max_seqs=3, budget=1000)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 4, arrival=i), now=0.0)
    plan = step(sched)
    assert len(plan.scheduled) == 3 and sched.num_waiting == 2


def test_preemption_frees_newest_and_resumes_it():
    # 6 blocks of 4 tokens = 24 token slots; two requests of 8-token prompts growing to 20 tokens.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    sched.add_request(make_request("old", 8, max_tokens=12, arrival=0), now=0.0)
    sched.add_request(make_request("new", 8, max_tokens=12, arrival=1), now=0.0)
    preempted = []
    for _ in range(60):
        if not sched.has_unfinished_requests():
            break
        plan = step(sched)
        preempted += [r.request_id for r in plan.preempted]
    assert not sched.has_unfinished_requests()
    assert preempted and set(preempted) == {"new"}  # FCFS preempts the newest arrival
    assert sched.num_preemptions == len(preempted)
    assert sched.kv.num_free_blocks == 6


def test_abort_frees_blocks_of_running_and_waiting():
    sched = make_scheduler(num_blocks=10, block_size=4, budget=8, max_seqs=1)
    sched.add_request(make_request("a", 20), now=0.0)
    sched.add_request(make_request("b", 20), now=0.0)
    step(sched)
    assert sched.kv.num_used_blocks == 2
    done = sched.finish_requests(["a", "b", "missing"], RequestStatus.FINISHED_ABORTED, now=0.0)
    assert {r.request_id for r in done} == {"a", "b"}
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in done)
    assert sched.kv.num_used_blocks == 0 and not sched.has_unfinished_requests()
    sched.check_integrity()


def test_prompt_larger_than_pool_is_rejected_and_output_is_capped():
    sched = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV cache holds at most 16 tokens per request"):
        sched.add_request(make_request("big", 16), now=0.0)
    request = make_request("ok", 10, max_tokens=100)
    sched.add_request(request, now=0.0)
    assert request.max_output_tokens == 6  # a request alone always fits the pool


def test_priority_policy_admits_lower_priority_value_first():
    sched = make_scheduler(max_seqs=1, budget=100, policy="priority")
    sched.add_request(make_request("late_urgent", 4, arrival=5, priority=-1), now=0.0)
    sched.add_request(make_request("early", 4, arrival=0, priority=0), now=0.0)
    plan = step(sched)
    assert [s.request_id for s in plan.scheduled] == ["late_urgent"]


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_scheduler(policy="nope")
