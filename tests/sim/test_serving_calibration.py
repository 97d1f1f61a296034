"""The serving path's share: the core's step trace read back, the overhead fit, and the
simulator's front-end delays (TTFT moves by admit + deliver, TPOT does not)."""
from __future__ import annotations

import json

import pytest

from punctual.bench.workloads import generate_workload
from punctual.config import SchedulerConfig
from punctual.sim.engine import ClusterConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import StepProfile
from punctual.sim.trace import StepTrace, fit_serving_overhead, read_trace

COEFFICIENTS = {"fixed": 0.02, "prefill_tokens": 4e-4, "decode_rows": 6e-4, "context_tokens": 1e-6,
                "attention_pairs": 2e-8, "sampled_rows": 1e-4}


def run(profile: StepProfile):
    sim = Simulator(ClusterConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 300), profile)
    requests = to_sim_requests(generate_workload("chat", 20, 2, 0.1))
    outcomes, _ = sim.run(requests, offsets=[i * 0.3 for i in range(len(requests))])
    return sorted(outcomes, key=lambda o: o.request.index)


def test_front_end_delays_shift_ttft_not_tpot():
    plain = run(StepProfile("linear", dict(COEFFICIENTS)))
    fronted = run(StepProfile("linear", dict(COEFFICIENTS), frontend={"admit_s": 0.004, "deliver_s": 0.007}))
    for a, b in zip(plain, fronted):
        assert b.sent == pytest.approx(a.sent)
        # arrivals 0.3 s apart never queue here, so every token is exactly 11 ms later
        assert [t - b.sent for t in b.token_times] == pytest.approx([t - a.sent + 0.011 for t in a.token_times])


def test_profile_keeps_its_front_end(tmp_path):
    profile = StepProfile("linear", dict(COEFFICIENTS), frontend={"admit_s": 0.003, "deliver_s": 0.002})
    profile.save(tmp_path / "p.json")
    loaded = StepProfile.from_json(json.loads((tmp_path / "p.json").read_text()))
    assert (loaded.admit_s, loaded.deliver_s) == (0.003, 0.002)
    assert StepProfile("linear", dict(COEFFICIENTS)).admit_s == 0.0


def test_trace_periods_and_first_tokens(tmp_path, monkeypatch):
    """Back-to-back steps last until the next plan; a step before idleness until its send."""
    from types import SimpleNamespace

    from punctual.plan import ScheduledRequest, StepPlan

    clock = iter([10.0, 10.5, 11.0, 11.2, 11.3, 11.4, 20.0, 20.9, 21.0]).__next__
    monkeypatch.setattr("punctual.sim.trace.time.monotonic", clock)
    plan = StepPlan(scheduled=[ScheduledRequest("a", [1, 2, 3], 0, (), samples=True)])

    class Scheduler:
        def schedule(self, now, offers=None):
            return plan

    scheduler = Scheduler()
    trace = StepTrace(str(tmp_path / "t.jsonl"), scheduler)
    trace.added("a", 9.9)  # received 10.0
    scheduler.schedule(0.0)  # planned 10.5
    trace.stepped(True, [SimpleNamespace(request_id="a", first_token_time=1.0)])  # sent 11.0
    scheduler.schedule(0.0)  # 11.2, back to back
    trace.stepped(False, [SimpleNamespace(request_id="a", first_token_time=None)])  # 11.3
    scheduler.schedule(0.0)  # 11.4
    trace.stepped(False, [])  # sent 20.0
    scheduler.schedule(0.0)  # 20.9, after the loop went idle
    trace.stepped(True, [])  # sent 21.0
    trace.close()
    read = read_trace(str(tmp_path / "t.jsonl"))
    assert read.seconds == pytest.approx([0.7, 0.2, 8.6, 0.1])
    assert read.admit_delays == pytest.approx([0.1])
    assert read.first_token_sent == {"a": 11.0}
    assert read.rows[0] == (1.0, 3.0, 0.0, 3.0, 6.0, 1.0)


def test_serving_overhead_fit_recovers_a_known_one():
    base = StepProfile("linear", dict(COEFFICIENTS))
    rows = [(1.0, float(p), float(d), float(c), float(c * 2), float(d + (p > 0))) for p, d, c in
            [(0, 1, 40), (0, 4, 400), (64, 2, 300), (0, 8, 900), (128, 0, 128), (0, 16, 2000), (32, 3, 100)] * 3]
    seconds = [1.2 * base.predict(x) + 0.003 + 0.0005 * x[5] for x in rows]
    fitted, kept = fit_serving_overhead(base.predict, rows, seconds)
    assert fitted["scale"] == pytest.approx(1.2, rel=1e-6)
    assert fitted["overhead_s"] == pytest.approx(0.003, rel=1e-6)
    assert fitted["per_row_s"] == pytest.approx(0.0005, rel=1e-6)
    assert len(kept) == len(rows)
