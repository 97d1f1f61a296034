"""Scheduling policies on hand-built queues: ordering, admission, victims, aging, fair shares. No torch."""
from __future__ import annotations

import random

import pytest

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.plan import ModelRunnerOutput
from punctual.request import EngineCoreRequest, Request, RequestStatus
from punctual.sampling_params import SamplingParams
from punctual.sched.cost_model import StepCostModel
from punctual.sched.predictor import OutputLengthPredictor, spearman
from punctual.sched.scheduler import Scheduler

_ids = iter(range(10**9))


def req(prompt_len=8, max_tokens=50, arrival=0.0, ttft=None, tpot=None, user=None, priority=0, rid=None):
    core = EngineCoreRequest(rid or f"r{next(_ids)}", [1000 + next(_ids) % 50000 for _ in range(prompt_len)],
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=arrival,
                             priority=priority, ttft_slo_ms=ttft, tpot_slo_ms=tpot, user=user)
    return Request(core, max_model_len=100_000)


def sched_with(policy, num_blocks=10_000, budget=64, max_seqs=64, **config):
    return Scheduler(SchedulerConfig(scheduling_policy=policy, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                                     **config), KVCacheManager(num_blocks, 16))


def step(sched, now):
    plan = sched.schedule(now)
    sched.update_from_output(plan, ModelRunnerOutput({s.request_id: [5] for s in plan.scheduled if s.samples}), now)
    sched.check_integrity()
    return plan


def known_costs(sched, fixed=0.01, per_token=0.001, per_seq=0.0):
    sched.cost_model.fixed_s, sched.cost_model.per_token_s, sched.cost_model.per_seq_s = fixed, per_token, per_seq


# ---- slo ------------------------------------------------------------------------------------
def test_slo_orders_by_ttft_slack():
    sched = sched_with("slo", max_seqs=1)
    known_costs(sched)
    relaxed = req(arrival=0.0, ttft=5000, rid="relaxed")
    urgent = req(arrival=1.0, ttft=500, rid="urgent")
    sched.add_request(relaxed, now=0.0)
    sched.add_request(urgent, now=1.0)
    plan = step(sched, now=1.01)
    assert [s.request_id for s in plan.scheduled] == ["urgent"]


def test_slo_sheds_request_that_cannot_meet_ttft():
    sched = sched_with("slo")
    known_costs(sched)
    late = req(arrival=0.0, ttft=100, rid="late")
    fine = req(arrival=0.9, ttft=1000, rid="fine")
    sched.add_request(late, now=0.0)
    sched.add_request(fine, now=0.9)
    plan = step(sched, now=1.0)  # `late` is 900 ms past its deadline
    assert [r.request_id for r in plan.rejected] == ["late"]
    assert late.status is RequestStatus.FINISHED_REJECTED and late.latency_metrics()["ttft_slo_met"] is None
    assert [s.request_id for s in plan.scheduled] == ["fine"]
    assert sched.kv.num_used_blocks > 0 and "late" not in sched.kv.block_tables


def test_slo_best_effort_demotes_instead_of_rejecting():
    sched = sched_with("slo", max_seqs=1, slo_overload_action="best_effort")
    known_costs(sched)
    late = req(arrival=0.0, ttft=100, rid="late")
    fresh = req(arrival=1.0, ttft=1000, rid="fresh")
    sched.add_request(late, now=0.0)
    sched.add_request(fresh, now=1.0)
    plan = step(sched, now=1.0)
    assert not plan.rejected and late.best_effort
    assert [s.request_id for s in plan.scheduled] == ["fresh"]  # SLO requests before best effort


def test_slo_sizes_prefill_chunks_to_keep_decodes_within_tpot():
    sched = sched_with("slo", budget=512)
    known_costs(sched, fixed=0.01, per_token=0.001)
    for i in range(4):
        sched.add_request(req(prompt_len=8, arrival=0.0, tpot=50, ttft=10_000), now=0.0)
    step(sched, now=0.0)
    sched.add_request(req(prompt_len=2000, arrival=0.1, ttft=100_000, rid="long"), now=0.1)
    plan = step(sched, now=0.1)
    chunk = {s.request_id: s.num_new_tokens for s in plan.scheduled}["long"]
    # 50 ms at 10 ms + 1 ms/token allows 40 tokens a step; 4 go to the decodes.
    assert chunk == 36
    assert sched.cost_model.predict(plan.num_batched_tokens, len(plan.scheduled)) <= 0.050 + 1e-9


def test_slo_prefill_keeps_progressing_when_decodes_fill_the_tpot():
    sched = sched_with("slo", budget=512, min_prefill_chunk=16)
    known_costs(sched, fixed=0.05, per_token=0.001)  # fixed cost alone breaks a 20 ms TPOT
    sched.add_request(req(prompt_len=8, tpot=20, ttft=10_000), now=0.0)
    step(sched, now=0.0)
    sched.add_request(req(prompt_len=500, ttft=100_000, rid="long"), now=0.0)
    chunk = {s.request_id: s.num_new_tokens for s in step(sched, now=0.0).scheduled}["long"]
    assert chunk == 16


def test_slo_victim_is_best_effort_first():
    sched = sched_with("slo")
    a, b = req(rid="a", arrival=0), req(rid="b", arrival=1)
    a.best_effort = True
    assert sched.policy.pick_victim([a, b], now=2.0) is a


# ---- sjf ------------------------------------------------------------------------------------
def test_sjf_prefers_shorter_predicted_output_and_ages():
    sched = sched_with("sjf", max_seqs=1, sjf_aging_tokens_per_s=10.0)
    predictor = sched.policy.predictor
    for _ in range(5):
        predictor.observe(8, 500, "essayist", None)
        predictor.observe(8, 10, "chatter", None)
    long_req = req(arrival=0.0, user="essayist", max_tokens=1000, rid="long")
    short_req = req(arrival=1.0, user="chatter", max_tokens=1000, rid="short")
    assert sched.policy.order_key(short_req, 1.0) < sched.policy.order_key(long_req, 1.0)
    # After ~50 s of waiting the long request's key has aged below the fresh short one's.
    fresh_short = req(arrival=60.0, user="chatter", max_tokens=1000)
    assert sched.policy.order_key(long_req, 60.0) < sched.policy.order_key(fresh_short, 60.0)
    # The victim is the longest predicted remaining work.
    assert sched.policy.pick_victim([short_req, long_req], 1.0) is long_req


def test_predictor_learns_rank_order():
    predictor = OutputLengthPredictor()
    rng = random.Random(0)
    users = {"a": 20, "b": 80, "c": 300}
    for _ in range(200):
        user = rng.choice(list(users))
        predicted = predictor.predict(50, 1000, user)
        predictor.observe(50, int(users[user] * rng.uniform(0.7, 1.3)), user, predicted)
    assert predictor.rank_correlation() > 0.8
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


# ---- fair -----------------------------------------------------------------------------------
def test_fair_serves_light_user_before_heavy_backlog():
    sched = sched_with("fair", max_seqs=2, budget=1000)
    for i in range(10):
        sched.add_request(req(prompt_len=32, max_tokens=20, user="heavy", arrival=i * 0.001), now=0.0)
    for _ in range(5):
        step(sched, now=0.0)
    light = req(prompt_len=32, max_tokens=20, user="light", arrival=1.0, rid="light")
    sched.add_request(light, now=1.0)
    while light.status is not RequestStatus.RUNNING:
        step(sched, now=1.0)
    # Admitted as soon as one seat freed: no heavy request that was queued before it went first.
    heavy_started = [r for r in sched.requests.values() if r.user == "heavy" and r.status is RequestStatus.RUNNING]
    assert len(heavy_started) == 1


def test_fair_shares_stay_within_vtc_bound():
    """Two backlogged users: the service gap stays within what one user can have in flight (max_num_seqs
    requests at their full weighted cost) plus the locality quantum. Service is charged as tokens are
    computed, so admitting a request can only open the gap by the work it has not yet done."""
    sched = sched_with("fair", max_seqs=4, budget=256)
    policy = sched.policy
    for i in range(40):
        sched.add_request(req(prompt_len=64, max_tokens=16, user="a", arrival=0.0), now=0.0)
        sched.add_request(req(prompt_len=16, max_tokens=64, user="b", arrival=0.0), now=0.0)
    max_cost = max(64 * 1 + 16 * 2, 16 * 1 + 64 * 2)
    bound = sched.config.max_num_seqs * max_cost + sched.config.fair_quantum_tokens
    max_gap = 0.0
    for _ in range(400):
        if not any(r.user == "a" for r in sched.waiting) or not any(r.user == "b" for r in sched.waiting):
            break
        step(sched, now=0.0)
        gap = abs(policy.counters["a"] - policy.counters["b"])
        max_gap = max(max_gap, gap)
        assert gap <= bound
    # And the scheduler really alternated: both users got a substantial share.
    assert min(policy.counters.values()) > 0.3 * max(policy.counters.values())


def test_fair_lifts_returning_user_counter():
    sched = sched_with("fair")
    policy = sched.policy
    policy.counters.update({"busy": 5000.0, "idle": 0.0})
    policy.active["busy"] = 1
    sched.add_request(req(user="idle"), now=0.0)
    assert policy.counters["idle"] == 5000.0  # idle time is not banked


def test_fair_victim_from_user_with_most_service():
    sched = sched_with("fair")
    sched.policy.counters.update({"rich": 900.0, "poor": 10.0})
    rich, poor = req(user="rich", arrival=0.0), req(user="poor", arrival=5.0)
    assert sched.policy.pick_victim([rich, poor], 6.0) is rich


# ---- mechanism shared by the policies ---------------------------------------------------------
def test_preemptions_per_request_are_bounded():
    """Three decodes each need a new block and one is free: FCFS would preempt the newest, but it
    has been preempted as often as allowed, so the scheduler spares it and preempts the next."""
    sched = sched_with("fcfs", num_blocks=4, max_preemptions_per_request=2)
    old, middle, newest = (req(prompt_len=15, arrival=float(i), rid=name)
                           for i, name in enumerate(["old", "middle", "newest"]))
    newest.num_preemptions = 2
    for request in (old, middle, newest):
        sched.add_request(request, now=0.0)
    step(sched, now=0.0)  # the prompts, one block each
    step(sched, now=0.1)  # position 15 still fits that block
    plan = step(sched, now=0.2)  # position 16 needs a second block each: one is free
    assert [r.request_id for r in plan.preempted] == ["middle"]
    assert {s.request_id for s in plan.scheduled} == {"old", "newest"}


def test_cost_model_fits_measured_steps():
    model = StepCostModel()
    rng = random.Random(1)
    for _ in range(100):
        tokens, seqs = rng.randrange(1, 512), rng.randrange(1, 64)
        model.observe(tokens, seqs, 0.004 + 0.0002 * tokens + 0.0005 * seqs)
    assert model.fixed_s == pytest.approx(0.004, rel=0.05)
    assert model.per_token_s == pytest.approx(0.0002, rel=0.05)
    # One sampled row per sequence: the per-sequence cost is shared between the two features.
    assert model.per_seq_s + model.per_row_s == pytest.approx(0.0005, rel=0.05)
    assert model.predict(300, 20) == pytest.approx(0.004 + 0.0002 * 300 + 0.0005 * 20, rel=0.02)
    assert model.tokens_within(0.004 + 0.0005 * 10 + 0.0002 * 100, 10) == pytest.approx(100, abs=1)


def test_cost_model_learns_what_a_speculated_row_costs():
    """Verified proposals are batched tokens that also pay for logits and sampling."""
    model = StepCostModel()
    rng = random.Random(2)
    truth = lambda t, s, r: 0.004 + 0.0002 * t + 0.0003 * s + 0.0004 * r  # noqa: E731
    for _ in range(200):
        seqs = rng.randrange(1, 64)
        spec = rng.randrange(0, 4 * seqs)
        tokens = seqs + spec + rng.randrange(0, 256)
        model.observe(tokens, seqs, truth(tokens, seqs, seqs + spec), sampled_rows=seqs + spec)
    assert model.per_row_s == pytest.approx(0.0004, rel=0.05)
    assert model.per_seq_s == pytest.approx(0.0003, rel=0.05)
    assert model.predict(100, 10, 40) == pytest.approx(truth(100, 10, 40), rel=0.02)


def test_scheduling_changes_when_never_what():
    """Every policy runs every request to the same number of tokens (the engine test checks token ids)."""
    results = {}
    for policy in ("fcfs", "priority", "slo", "sjf", "fair"):
        sched = sched_with(policy, num_blocks=40, budget=48, max_seqs=6)
        rng = random.Random(7)
        requests = [req(prompt_len=rng.randrange(4, 60), max_tokens=rng.randrange(1, 30), user=f"u{i % 3}",
                        arrival=i * 0.01, rid=f"{policy}-{i}") for i in range(20)]
        for r in requests:
            sched.add_request(r, now=r.arrival_time)
        now = 0.0
        while sched.has_unfinished_requests():
            now += 0.01
            step(sched, now)
        results[policy] = [r.num_output_tokens for r in requests]
        assert sched.kv.num_used_blocks == 0
    assert all(v == results["fcfs"] for v in results.values())
