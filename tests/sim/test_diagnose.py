"""The TPOT diagnostic (punctual.sim.diagnose): a request's decode steps read the same way from a
server's trace and from the simulator's own steps, and the simulator's TPOT is the bench's."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from punctual.bench.loadgen import Endpoint
from punctual.bench.workloads import generate_workload
from punctual.config import SchedulerConfig
from punctual.engine.trace import StepTrace
from punctual.plan import ScheduledRequest, StepPlan
from punctual.sim import diagnose
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import SimSender
from punctual.sim.profile import StepProfile
from punctual.sim.trace import read_trace

COEFFICIENTS = {"fixed": 0.02, "prefill_tokens": 4e-4, "decode_rows": 6e-4, "context_tokens": 1e-6,
                "attention_pairs": 2e-8, "sampled_rows": 1e-4}


def step(start, end, prefill, sampled):
    return diagnose.StepRecord(start, end, (1.0, float(prefill), 1.0, 10.0, 10.0, float(len(sampled))),
                               tuple(sampled))


def test_decode_breakdown_of_a_constructed_request():
    # "a": first token in step 0, then a decode-only step, a step beside b's prompt chunk, and a
    # step it sat out (preempted), then its last token.
    steps = [step(0.0, 1.0, 8, ["a"]), step(1.0, 1.1, 0, ["a"]), step(1.1, 1.4, 16, ["a"]),
             step(1.4, 1.5, 0, []), step(1.5, 1.6, 0, ["a"])]
    out = diagnose.decode_breakdown(steps, ["a", "missing"], predict=lambda x: 0.05 + 0.01 * x[1])
    assert out["num_requests"] == 1 and out["tokens"] == 4
    assert out["steps_per_token"] == pytest.approx(4 / 3)
    assert out["mixed_share"] == pytest.approx(1 / 4)
    assert out["decode_step_ms"] == pytest.approx(100.0)
    assert out["mixed_step_ms"] == pytest.approx(300.0)
    assert out["decode_predicted_ms"] == pytest.approx(50.0)
    assert out["mixed_predicted_ms"] == pytest.approx(210.0)
    assert out["engine_tpot_ms"] == pytest.approx(600.0 / 3)
    assert diagnose.decode_breakdown(steps[:1], ["a"]) is None  # one token: no decode phase


def test_trace_records_who_sampled(tmp_path, monkeypatch):
    clock = iter([1.0, 2.0, 3.0, 3.5]).__next__
    monkeypatch.setattr("punctual.engine.trace.time.monotonic", clock)
    plan = StepPlan(scheduled=[ScheduledRequest("a", [5], 7, (), samples=True, is_decode=True),
                               ScheduledRequest("b", [1, 2, 3], 0, (), samples=False)])

    class Scheduler:
        def schedule(self, now, offers=None):
            return plan

    scheduler = Scheduler()
    trace = StepTrace(str(tmp_path / "t.jsonl"), scheduler)
    scheduler.schedule(0.0)
    trace.stepped(True, [SimpleNamespace(request_id="a", first_token_time=None)])
    scheduler.schedule(0.0)
    trace.stepped(False, [])
    trace.close()
    steps = diagnose.trace_steps(read_trace(str(tmp_path / "t.jsonl")))
    assert [s.sampled for s in steps] == [("a",), ("a",)]  # b's chunk did not reach its prompt's end
    assert [(s.start, s.end) for s in steps] == [(1.0, 3.0), (3.0, 3.5)]  # until the next plan; the last until its send
    assert steps[0].mixed


def test_sim_tpot_is_the_bench_definition_and_its_steps_add_up():
    """The simulator's record TPOT is the bench's (e2e - TTFT) / (tokens - 1); with no per-stream
    delivery it equals the engine TPOT from the logged steps, and every request samples once per
    step of its decode phase (the same scheduler never skips a running request here)."""
    profile = StepProfile("linear", dict(COEFFICIENTS), frontend={"admit_s": 0.002, "deliver_s": 0.005})
    config = SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 300, repeat_decode_steps=False)
    simulator = Simulator(config, profile)
    steps = diagnose.record_steps(simulator)
    requests = generate_workload("chat", 12, 1, 0.1)
    result = SimSender(simulator)(Endpoint("sim://"), requests, offsets=[i * 0.05 for i in range(len(requests))])
    records = [r.to_json() for r in result.records]
    ids = [f"{simulator._run_id}-{r.index}" for r in result.records]
    for record in records:
        times = record["token_times_s"]
        assert record["tpot_s"] == pytest.approx((record["e2e_s"] - record["ttft_s"]) / (len(times) - 1))
        assert record["tpot_s"] == pytest.approx((times[-1] - times[0]) / (len(times) - 1))
    out = diagnose.decode_breakdown(steps, ids)
    assert out["num_requests"] == len(records)
    assert out["steps_per_token"] == pytest.approx(1.0)
    assert out["engine_tpot_ms"] == pytest.approx(diagnose.client_tpots(records)["tpot_ms"])
    assert 0 < out["mixed_share"] < 1  # arrivals 50 ms apart: prompt chunks beside decodes


def test_record_steps_needs_every_step():
    config = SimConfig(SchedulerConfig(max_num_seqs=8), 300)
    with pytest.raises(ValueError, match="repeat_decode_steps"):
        diagnose.record_steps(Simulator(config, StepProfile("linear", dict(COEFFICIENTS))))
    assert dataclasses.replace(config, repeat_decode_steps=False).repeat_decode_steps is False


def test_tpot_ratio_by_the_streams_a_request_decoded_beside():
    def record(index, sent, ttft, e2e, tpot):
        return {"index": index, "sent_s": sent, "ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot}

    # 0 decodes alone (0.1-1.0 s); 1, 2 and 3 together (10.1-11 s); 4 failed
    real = [record(0, 0.0, 0.1, 1.0, 0.010), record(1, 10.0, 0.1, 1.0, 0.020), record(2, 10.0, 0.1, 1.1, 0.020),
            record(3, 10.05, 0.1, 1.0, 0.020), {"index": 4, "sent_s": 12.0, "ttft_s": None, "e2e_s": None,
                                                 "tpot_s": None}]
    sim = [record(0, 0.0, 0.1, 1.0, 0.009), record(1, 10.0, 0.1, 1.0, 0.015), record(2, 10.0, 0.1, 1.1, 0.016),
           record(3, 10.05, 0.1, 1.0, 0.014), record(4, 12.0, 0.1, 1.0, 0.010)]
    assert diagnose.concurrent_streams(real[:4]) == {0: 1, 1: 3, 2: 3, 3: 3}
    by_streams = diagnose.tpot_ratio_by_streams(real, sim)
    assert by_streams == {"1": {"num_requests": 1, "median_ratio": pytest.approx(0.9)},
                          "2-3": {"num_requests": 3, "median_ratio": pytest.approx(0.75)}}
    assert diagnose.describe_ratios(by_streams) == "1: x0.900 (1), 2-3: x0.750 (3)"
