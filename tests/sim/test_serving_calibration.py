"""The serving path's share: the core's step trace read back, the overhead fit, and the
simulator's front-end delays (TTFT moves by admit + deliver, TPOT does not)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from punctual.bench.workloads import generate_workload
from punctual.config import SchedulerConfig
from punctual.config import ClusterConfig
from punctual.engine.trace import StepTrace, replica_trace_path, trace_paths
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import PREFILL_STEPS, StepProfile
from punctual.sim.trace import first_token_path, fit_serving_overhead, match_records, read_trace, read_traces
from punctual.sim.validate import ValidateConfig

COEFFICIENTS = {"fixed": 0.02, "prefill_tokens": 4e-4, "decode_rows": 6e-4, "context_tokens": 1e-6,
                "attention_pairs": 2e-8, "sampled_rows": 1e-4}


def run(profile: StepProfile):
    sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 300), profile)
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
    monkeypatch.setattr("punctual.engine.trace.time.monotonic", clock)
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


def test_a_clusters_traces_read_as_one(tmp_path):
    """`serve --replicas N` traces one file per replica: each core's step periods come from its own
    steps (never from the other replica's plan), first tokens point at the right merged step, and
    requests come in the order the cores received them."""
    def step(planned, sent, first=(), idle=False):
        return {"step": [1, 0, 0, 3, 0, 1], "planned": planned, "sent": sent, "idle_before": idle, "first": list(first)}

    base = str(tmp_path / "steps.jsonl")
    files = {0: [{"add": "a", "arrival": 1.0, "received": 1.1}, step(1.2, 1.3, ["a"], True), step(1.4, 1.5),
                 {"add": "c", "arrival": 3.0, "received": 3.2}, step(3.3, 3.6, ["c"], True)],
             1: [{"add": "b", "arrival": 1.05, "received": 1.15}, step(1.25, 1.45, ["b"], True), step(1.5, 1.9)]}
    for replica, records in files.items():
        Path(replica_trace_path(base, replica)).write_text("".join(json.dumps(r) + "\n" for r in records))
    Path(base + ".replica-old").write_text("")  # not a replica's file
    assert trace_paths(base) == [replica_trace_path(base, 0), replica_trace_path(base, 1)]
    trace = read_traces(base)
    # replica 0: 1.2 -> 1.4 (back to back), 1.4 -> 1.5 (then idle), 3.3 -> 3.6; replica 1: 1.25 -> 1.5, 1.5 -> 1.9
    assert trace.seconds == pytest.approx([0.2, 0.1, 0.3, 0.25, 0.4])
    assert [a["add"] for a in trace.adds] == ["a", "b", "c"]
    assert trace.first_token_step == {"a": 0, "c": 2, "b": 3}
    assert trace.first_token_sent == {"a": 1.3, "b": 1.45, "c": 3.6}
    path = first_token_path(trace, trace.adds[1], client_ttft_s=0.5)
    assert path["queued_s"] == pytest.approx(0.1) and path["first_step_s"] == pytest.approx(0.25)
    assert read_traces(replica_trace_path(base, 0)).seconds == pytest.approx([0.2, 0.1, 0.3])
    with pytest.raises(FileNotFoundError, match="no step trace"):
        read_traces(str(tmp_path / "none.jsonl"))


def test_a_moved_requests_first_token_is_where_it_was_made(tmp_path):
    """Prefill/decode: the decode core of a trace written before it knew a moved request had its
    first token also reports one, later; the merged trace keeps the prefill core's (the earliest),
    whichever file comes last, so the delivery delay is measured from the step that made it."""
    def step(planned, sent, first=(), idle=False):
        return {"step": [1, 8, 0, 8, 36, 1], "planned": planned, "sent": sent, "idle_before": idle,
                "first": list(first)}

    base = str(tmp_path / "steps.jsonl")
    files = {0: [{"add": "a", "arrival": 1.0, "received": 1.1}, step(1.2, 1.3, ["a"], True)],
             1: [step(1.6, 1.7, ["a"], True), step(1.7, 1.8)]}
    for replica, records in files.items():
        Path(replica_trace_path(base, replica)).write_text("".join(json.dumps(r) + "\n" for r in records))
    trace = read_traces(base)
    assert trace.first_token_sent == {"a": 1.3} and trace.first_token_step == {"a": 0}
    path = first_token_path(trace, trace.adds[0], client_ttft_s=0.35)
    assert path["deliver_s"] == pytest.approx(0.05) and path["step_prefill_tokens"] == 8


def test_serving_overhead_fit_recovers_a_known_one():
    base = StepProfile("linear", dict(COEFFICIENTS))
    rows = [(1.0, float(p), float(d), float(c), float(c * 2), float(d + (p > 0))) for p, d, c in
            [(0, 1, 40), (0, 4, 400), (64, 2, 300), (0, 8, 900), (128, 0, 128), (0, 16, 2000), (32, 3, 100)] * 3]
    seconds = [1.2 * base.predict(x) + 0.003 + 0.0005 * x[5] + 0.004 * (x[1] > 0) for x in rows]
    fitted, kept = fit_serving_overhead(base.predict, rows, seconds)
    assert fitted["scale"] == pytest.approx(1.2, rel=1e-6)
    assert fitted["overhead_s"] == pytest.approx(0.003, rel=1e-6)
    assert fitted["per_row_s"] == pytest.approx(0.0005, rel=1e-6)
    assert fitted["prefill_step_s"] == pytest.approx(0.004, rel=1e-6)
    assert len(kept) == len(rows)


def test_fit_error_reported_by_batch_size():
    from punctual.sim.calibrate_server import fit_serving_profile
    from punctual.sim.trace import ServerTrace

    base = StepProfile("linear", dict(COEFFICIENTS))
    rows = [(1.0, 0.0, float(d), float(40 * d), float(40 * d), float(d)) for d in (1, 1, 2, 3, 8, 12, 24)] * 5
    # The server's step grows faster than linearly with the batch: no line fits both ends.
    seconds = [base.predict(x) * (1 + 0.002 * x[5] ** 2) for x in rows]
    profile = fit_serving_profile(base, ServerTrace(rows, seconds, [], {}), [], {})
    by_batch = profile.fit["server"]["by_batch"]
    assert {label: b["num_steps"] for label, b in by_batch.items()} == {"1": 10, "2-4": 10, "5-16": 10, "17+": 5}
    inside = [i for i, x in enumerate(rows) if x[5] >= 17]
    assert by_batch["17+"]["time_ratio"] == pytest.approx(sum(seconds[i] for i in inside) /
                                                          sum(profile.predict(rows[i]) for i in inside))
    assert by_batch["17+"]["time_ratio"] > 1.02  # the biggest batches cost more than the fit says


def test_prefill_step_cost_in_the_profile(tmp_path):
    """A step with prompt tokens costs "prefill_steps" more; a profile without it (older files) 0."""
    plain = StepProfile("linear", dict(COEFFICIENTS))
    served = StepProfile("linear", {**COEFFICIENTS, PREFILL_STEPS: 0.004})
    prefill, decode = (1.0, 32.0, 1.0, 64.0, 600.0, 2.0), (1.0, 0.0, 4.0, 400.0, 400.0, 4.0)
    assert served.predict(prefill) == pytest.approx(plain.predict(prefill) + 0.004)
    assert served.predict(decode) == pytest.approx(plain.predict(decode))
    served.save(tmp_path / "p.json")
    assert StepProfile.from_json(json.loads((tmp_path / "p.json").read_text())).predict(prefill) == \
        pytest.approx(served.predict(prefill))
    # The simulator charges it on each request's prefill step: with requests far apart (no step
    # shared), each TTFT is exactly 4 ms later and the decodes after it are unchanged.
    def alone(profile):
        sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), 300), profile)
        requests = to_sim_requests(generate_workload("chat", 8, 2, 0.1))
        outcomes, _ = sim.run(requests, offsets=[i * 10.0 for i in range(len(requests))])
        return sorted(outcomes, key=lambda o: o.request.index)
    for x, y in zip(alone(plain), alone(served)):
        assert y.token_times[0] - y.sent == pytest.approx(x.token_times[0] - x.sent + 0.004)
        assert [t - y.token_times[0] for t in y.token_times] == pytest.approx([t - x.token_times[0] for t in x.token_times])


def test_admit_delay_left_out_when_the_request_waited_for_a_step(tmp_path):
    """A request that arrives mid-step waits for that step before the core reads it; the
    simulator charges that wait itself, so the front end's delay is fitted without it."""
    lines = [{"add": "a", "arrival": 1.000, "received": 1.002},  # core idle: 2 ms of front end
             {"step": [1.0, 5.0, 0.0, 5.0, 15.0, 1.0], "planned": 1.002, "sent": 1.020, "idle_before": True,
              "first": ["a"]},
             {"add": "b", "arrival": 1.005, "received": 1.021},  # arrived mid-step: 16 ms, mostly the step
             {"step": [1.0, 3.0, 1.0, 9.0, 12.0, 2.0], "planned": 1.021, "sent": 1.040, "idle_before": False,
              "first": ["b"]},
             {"add": "c", "arrival": 1.050, "received": 1.051}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    trace = read_trace(str(path))
    assert trace.admit_delays == pytest.approx([0.002, 0.016, 0.001])
    assert trace.front_end_delays == pytest.approx([0.002, 0.001])
    assert [a["mid_step"] for a in trace.adds] == [False, True, False]


def test_first_token_path_matched_to_client_records(tmp_path):
    """`sim validate --server-trace`: each client record finds its traced request by lengths (a
    warm-up the client did not record is skipped), and its TTFT splits into the front end in,
    the queue, the first step and the delivery."""
    lines = [{"add": "w", "arrival": 0.5, "received": 0.501, "prompt_tokens": 7, "max_tokens": 2},
             {"step": [1.0, 7.0, 0.0, 7.0, 28.0, 1.0], "planned": 0.501, "sent": 0.52, "idle_before": True,
              "first": ["w"]},
             {"add": "a", "arrival": 1.000, "received": 1.002, "prompt_tokens": 5, "max_tokens": 9},
             {"step": [1.0, 5.0, 0.0, 5.0, 15.0, 1.0], "planned": 1.003, "sent": 1.020, "idle_before": True,
              "first": ["a"]},
             {"add": "b", "arrival": 1.010, "received": 1.021, "prompt_tokens": 3, "max_tokens": 4},
             {"step": [1.0, 3.0, 1.0, 9.0, 12.0, 2.0], "planned": 1.021, "sent": 1.040, "idle_before": False,
              "first": ["b"]},
             {"step": [1.0, 0.0, 2.0, 11.0, 11.0, 2.0], "planned": 1.041, "sent": 1.050, "idle_before": False,
              "first": []}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    trace = read_trace(str(path))
    records = [{"sent_s": 0.6, "prompt_tokens": 3, "output_len": 4, "ttft_s": 0.036},
               {"sent_s": 0.5, "prompt_tokens": 5, "output_len": 9, "ttft_s": 0.025}]
    matched, end = match_records(trace.adds, records)
    assert [m["add"] for m in matched] == ["b", "a"] and end == 3
    a = first_token_path(trace, matched[1], records[1]["ttft_s"])
    assert a["admit_s"] == pytest.approx(0.002) and a["queued_s"] == pytest.approx(0.001)
    assert a["first_step_s"] == pytest.approx(0.018) and a["deliver_s"] == pytest.approx(0.005)
    assert (a["streams"], a["mid_step"]) == (1.0, False)
    b = first_token_path(trace, matched[0], records[0]["ttft_s"])
    assert b["first_step_s"] == pytest.approx(0.020) and b["deliver_s"] == pytest.approx(0.006)
    assert (b["streams"], b["mid_step"]) == (2.0, True)


def test_validate_against_earlier_measurements(tmp_path):
    """`sim validate --measured FILE` runs only the simulator against the measured runs kept in an
    earlier --output: fed its own simulated runs it agrees exactly, and another plan is refused."""
    from punctual.sim.validate import validate

    profile = StepProfile("linear", dict(COEFFICIENTS), num_kv_blocks=300, model={"max_model_len": 2048},
                          frontend={"admit_s": 0.001, "deliver_s": 0.005})
    profile.save(tmp_path / "p.json")
    args = ValidateConfig(profile=str(tmp_path / "p.json"), model="builtin", workload="chat", sweep_rates="1,2",
                          num_requests=6, seed=0, length_scale=0.1, ttft_slo_ms=2000.0, tpot_slo_ms=200.0,
                          serve_args="", output=str(tmp_path / "first.json"), startup_timeout=1.0,
                          measured=None, server_trace=None, rescale_per_point=False, sim_repeats=8)
    first = tmp_path / "first.json"
    # an earlier run's file whose "measured" side is this profile's simulation
    validate(dataclasses.replace(args, measured=str(_self_measured(tmp_path, args))), log=lambda _: None)
    rows = json.loads(first.read_text())["errors"]
    assert len(rows) == 8 and all(r["error"] == pytest.approx(0.0) for r in rows)
    with pytest.raises(ValueError, match="--sweep-rates"):
        validate(dataclasses.replace(args, sweep_rates="1", measured=str(first)), log=lambda _: None)


def _self_measured(tmp_path, args):
    from punctual.bench.cli import plan_from_args
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.sweep import bench_endpoint
    from punctual.sim.loadgen import SimSender
    from punctual.sim.profile import load_profile
    from punctual.sim.sizing import cluster_config
    from punctual.sim.validate import bench_args, engine_flags

    profile = load_profile(args.profile)
    plan = plan_from_args(bench_args(args))
    simulator = Simulator(cluster_config(engine_flags(args.serve_args, profile), profile, plan.slo), profile)
    runs = bench_endpoint(Endpoint("sim://"), plan, system="punctual", progress=False, log=lambda _: None,
                          send=SimSender(simulator, slo=plan.slo))
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"measured": runs}, default=str))
    return path


def test_delivery_grows_with_the_streams_of_its_step():
    """deliver = fixed + per stream x streams sampled in the first token's step, fitted from
    (streams, delay) pairs; the simulator adds it per step, so a lone stream pays one stream's."""
    from punctual.sim.calibrate_server import fit_delivery

    pairs = [(float(s), 0.003 + 0.0005 * s) for s in (1, 2, 3, 5, 8) for _ in range(3)]
    assert fit_delivery(pairs) == pytest.approx((0.003, 0.0005))
    assert fit_delivery([(1.0, 0.004), (1.0, 0.006), (1.0, 0.005)]) == (pytest.approx(0.005), 0.0)  # one count
    assert fit_delivery([(1.0, 0.006), (4.0, 0.003)])[1] == 0.0  # a falling fit is not a cost
    assert fit_delivery([]) == (0.0, 0.0)
    def simulate(profile, spacing_s):
        sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), 300), profile)
        requests = to_sim_requests(generate_workload("chat", 8, 2, 0.1))
        outcomes, _ = sim.run(requests, offsets=[i * spacing_s for i in range(len(requests))])
        return sorted(outcomes, key=lambda o: o.request.index)

    front = {"admit_s": 0.0, "deliver_s": 0.004}
    plain = StepProfile("linear", dict(COEFFICIENTS), frontend=front)
    streamed = StepProfile("linear", dict(COEFFICIENTS), frontend={**front, "deliver_per_stream_s": 0.001})
    for a, b in zip(simulate(plain, 10.0), simulate(streamed, 10.0)):  # alone: every step samples one stream
        assert [t - b.sent for t in b.token_times] == pytest.approx([t - a.sent + 0.001 for t in a.token_times])
    together = [b.token_times[0] - a.token_times[0] for a, b in zip(simulate(plain, 0.0), simulate(streamed, 0.0))]
    assert max(together) > 0.0015  # sent at once: first tokens in steps of several streams


def test_fitted_profile_prices_each_kind_of_step_as_tpot_weighs_it():
    """A trace of mostly single-stream steps (the one-at-a-time phase), scattered by interference,
    and a few busy ones that pay the front end's cost per stream: the fit must be right where
    TPOT looks, each step weighted by its streams. The fitted profile's streams-weighted mean
    price equals the traced one for decode-only steps and for steps with prompt tokens (an
    unweighted fit matches the plain means instead, which the single-stream steps set)."""
    from punctual.sim.calibrate_server import fit_serving_profile
    from punctual.sim.trace import ServerTrace

    base = StepProfile("linear", dict(COEFFICIENTS))
    decode = [(1.0, 0.0, float(d), float(60 * d), float(60 * d), float(d)) for d in [1] * 40 + [2, 4, 8, 16, 24, 30]]
    mixed = [(1.0, float(p), float(d), float(60 * d + p), float(60 * d + p * p / 2), float(d + 1))
             for p, d in [(64, 0), (128, 1), (32, 6), (200, 20), (16, 28)] * 2]
    rows = decode + mixed
    scatter = [1.0, 0.95, 1.3, 1.05, 0.9]  # interference on the short steps only
    seconds = [(base.predict(x) * 1.1 + 0.001 + 0.0006 * x[5] + 0.004 * (x[1] > 0))
               * (scatter[i % len(scatter)] if x[5] == 1 else 1.0) for i, x in enumerate(rows)]
    profile = fit_serving_profile(base, ServerTrace(rows, seconds, [], {}), [], {})
    server = profile.fit["server"]
    for kind, steps in (("decode", decode), ("mixed", mixed)):
        traced = sum(max(1.0, x[5]) * s for x, s in zip(rows, seconds) if x in steps)
        priced = sum(max(1.0, x[5]) * profile.predict(x) for x in steps)
        # Exact for the line alone; the 1-stream bucket's row factor (its 40 steps, the only
        # bucket with enough) moves the decode total by a fraction of a percent.
        assert priced == pytest.approx(traced, rel=0.01), kind
        unweighted = sum(profile.predict(x) for x in steps) / sum(s for x, s in zip(rows, seconds) if x in steps)
        assert unweighted != pytest.approx(1.0, rel=1e-3), kind  # the weights did something
    assert server["per_row_s"] == pytest.approx(0.0006, rel=0.2)
    assert set(server["by_kind"]) == {"decode", "mixed"}
    assert server["by_kind"]["decode"]["17+"]["num_steps"] == 2
    assert server["by_kind"]["decode"]["17+"]["tpot_ratio"] == pytest.approx(1.0, rel=0.03)


class _BusyServer(StepProfile):
    """A server whose step costs more per stream the more streams it serves (a front end and
    clients sharing the cores, caches shared by more streams): no line in the streams fits it."""

    def predict(self, x):
        return super().predict(x) * 1.05 + 0.001 + 0.0004 * x[5] + 0.00004 * x[5] ** 2


def test_a_calibration_with_full_batches_prices_a_busy_servers_tpot():
    """The trace of a calibration that only ran requests one at a time and at a low rate (batches
    of 1-3) fits a per-stream cost that a busy server's TPOT outgrows: simulated, that server's
    TPOT comes out early, as the issue's did at 2-8 req/s. With the closed loop of max_num_seqs
    clients that `calibrate --server` ends with, the fit sees full batches and the busy TPOT holds."""
    from punctual.sim import diagnose
    from punctual.sim.calibrate_server import fit_serving_profile
    from punctual.sim.trace import ServerTrace

    base = StepProfile("linear", dict(COEFFICIENTS))
    server = _BusyServer("linear", dict(COEFFICIENTS))
    scheduler = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128)

    def simulator(profile):
        return Simulator(SimConfig(scheduler, 800, repeat_decode_steps=False), profile)

    def calibration_trace(closed_loop: bool) -> ServerTrace:
        traced = simulator(server)
        steps = diagnose.record_steps(traced)
        traced.run(to_sim_requests(generate_workload("chat", 8, 1, 0.1)), concurrency=1)
        traced.run(to_sim_requests(generate_workload("chat", 20, 2, 0.1)), offsets=[i * 0.5 for i in range(20)])
        if closed_loop:
            traced.run(to_sim_requests(generate_workload("chat", 32, 3, 0.1)), concurrency=16)
        return ServerTrace([s.features for s in steps], [s.end - s.start for s in steps], [], {})

    def busy_tpot(profile) -> float:
        outcomes, _ = simulator(profile).run(to_sim_requests(generate_workload("chat", 40, 5, 0.1)),
                                             offsets=[i * 0.02 for i in range(40)])
        tpots = [(o.token_times[-1] - o.token_times[0]) / (len(o.token_times) - 1) for o in outcomes
                 if len(o.token_times) > 1]
        return sum(tpots) / len(tpots)

    real = busy_tpot(server)
    low_load = fit_serving_profile(base, calibration_trace(False), [], {})
    full = fit_serving_profile(base, calibration_trace(True), [], {})
    assert busy_tpot(low_load) / real < 0.9
    assert busy_tpot(full) / real == pytest.approx(1.0, abs=0.03)
    assert full.fit["server"]["by_kind"]["decode"]["5-16"]["tpot_ratio"] == pytest.approx(1.0, abs=0.05)


class _DispatchTable(StepProfile):
    """An engine whose kernel table sends batches above 4 rows to another kernel: the step's cost
    jumps there by a third, and no line in the features follows it."""

    def predict(self, x):
        return super().predict(x) * (1.35 if x[5] > 4 else 1.0)


def test_row_factors_follow_a_kernel_tables_jump():
    """`calibrate --server` fits a factor per bucket of streams on the linear price, so a jump at
    a dispatch boundary is priced on both sides: each bucket's streams-weighted mean price equals
    the traced one, where the linear fit alone misses the bucket past the jump. The factors
    survive the profile's JSON; a malformed table is refused with its name."""
    from punctual.sim.calibrate_server import ROW_BUCKET_MIN_STEPS, fit_serving_profile
    from punctual.sim.trace import ServerTrace

    base = StepProfile("linear", dict(COEFFICIENTS))
    engine = _DispatchTable("linear", dict(COEFFICIENTS))
    counts = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32]
    rows = [(1.0, 0.0, float(d), float(60 * d + k), float(60 * d + k), float(d))
            for d in counts for k in range(ROW_BUCKET_MIN_STEPS + 2)]
    seconds = [engine.predict(x) for x in rows]
    linear_only = StepProfile("linear", fit_serving_profile(base, ServerTrace(rows, seconds, [], {}), [], {})
                              .coefficients)
    profile = fit_serving_profile(base, ServerTrace(rows, seconds, [], {}), [], {})
    assert profile.row_factors is not None
    for low, high in ((1, 4), (5, 8), (9, 16), (17, 32)):
        inside = [i for i, x in enumerate(rows) if low <= x[5] <= high]
        traced = sum(rows[i][5] * seconds[i] for i in inside)
        assert sum(rows[i][5] * profile.predict(rows[i]) for i in inside) == pytest.approx(traced, rel=0.01), low
    past_jump = [i for i, x in enumerate(rows) if 5 <= x[5] <= 8]
    missed = sum(linear_only.predict(rows[i]) for i in past_jump) / sum(seconds[i] for i in past_jump)
    assert abs(missed - 1.0) > 0.04  # the line alone is off there
    again = StepProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert [again.predict(x) for x in rows] == [profile.predict(x) for x in rows]
    with pytest.raises(ValueError, match="row_factors"):
        StepProfile("linear", dict(COEFFICIENTS), row_factors=[[4, 1, 1.0]])


def test_delivery_is_fitted_without_the_closed_loops_queue(tmp_path):
    """The closed loop that ends `calibrate --server` has hundreds of clients on the server's cores:
    its first tokens wait for the load generator, so its delivery delays are left out of the
    front end's fit (its steps are kept). The one-at-a-time and open-loop requests' are in."""
    from punctual.bench.loadgen import LoadResult, RequestRecord
    from punctual.sim.calibrate_server import delivery_samples

    lines, t = [], 1.0
    for name, prompt, streams in (("warm", 9, 1.0), ("alone", 5, 1.0), ("open", 6, 2.0), ("closed", 7, 3.0)):
        lines.append({"add": name, "arrival": t, "received": t + 0.002, "prompt_tokens": prompt, "max_tokens": 4})
        lines.append({"step": [1.0, float(prompt), streams - 1, 20.0, 40.0, streams], "planned": t + 0.003,
                      "sent": t + 0.020, "idle_before": True, "first": [name]})
        t += 1.0
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    trace = read_trace(str(path))

    def record(prompt, deliver, sent):  # the client's TTFT: the core's send after arrival + the delivery
        return RequestRecord(0, prompt, 4, sent_s=sent, ttft_s=0.020 + deliver, prompt_tokens=prompt)
    alone, open_loop, closed = [record(5, 0.004, 0.0)], [record(6, 0.006, 0.0)], [record(7, 0.090, 0.0)]
    phases = [LoadResult(open_loop, 1.0), LoadResult(closed, 1.0)]
    kept = delivery_samples(trace, alone, phases, 1, closed_loop=True)
    assert [(s, round(d, 6)) for s, d in kept] == [(1.0, 0.004), (2.0, 0.006)]
    every = delivery_samples(trace, alone, phases, 1, closed_loop=False)  # no closed loop: all are open-loop
    assert [round(d, 6) for _, d in every] == [0.004, 0.006, 0.09]
