"""The simulator: deterministic, torch-free, the bench's report, and the real scheduler's decisions."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from punctual.bench.loadgen import LoadResult, RequestRecord
from punctual.bench.metrics import SLO, summarize
from punctual.bench.workloads import generate_workload
from punctual.cli import main
from punctual.config import SchedulerConfig
from punctual.config import ClusterConfig
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import SimSender, to_sim_requests
from punctual.sim.profile import FEATURES, StepProfile, fit_linear, plan_features

COEFFICIENTS = {"fixed": 0.02, "prefill_tokens": 4e-4, "decode_rows": 6e-4, "context_tokens": 1e-6,
                "attention_pairs": 2e-8, "sampled_rows": 1e-4}


def profile(**extra) -> StepProfile:
    return StepProfile("linear", dict(COEFFICIENTS), model={"name": "test", "max_model_len": 1024,
                                                            "kv_bytes_per_token": 1000}, num_kv_blocks=400, **extra)


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    profile().save(path)
    return path


def sim_argv(profile_path, output, *extra):
    return ["sim", "run", "--profile", str(profile_path), "--num-requests", "30", "--length-scale", "0.1",
            "--ttft-slo-ms", "500", "--tpot-slo-ms", "60", "--output", str(output), "--no-progress", *extra]


def test_run_path_imports_no_torch():
    code = ("import sys, punctual.sim.engine, punctual.sim.loadgen, punctual.sim.cli, punctual.sim.planner, "
            "punctual.sim.hardware, punctual.sim.routing; from punctual.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow  # a sweep run twice, byte for byte
def test_same_inputs_same_json_byte_for_byte(profile_path, tmp_path):
    out = tmp_path / "run.json"
    argv = sim_argv(profile_path, out, "--sweep-rates", "2,8", "--workload", "chat,shared-prefix",
                    "--scheduling-policy", "slo", "--replicas", "2", "--router", "least_loaded")
    assert main(argv) == 0
    first = out.read_bytes()
    assert main(argv) == 0
    assert out.read_bytes() == first
    assert main(sim_argv(profile_path, out, "--sweep-rates", "2,8", "--workload", "chat,shared-prefix",
                         "--scheduling-policy", "slo", "--replicas", "2", "--router", "least_loaded",
                         "--seed", "1")) == 0
    assert out.read_bytes() != first


def test_report_has_the_bench_schema_and_plots(profile_path, tmp_path):
    out = tmp_path / "sweep.json"
    assert main(sim_argv(profile_path, out, "--sweep-rates", "1,4,64")) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {"config", "runs", "goodput", "skipped"}
    # The keys a measured run has, from the bench's own summarize.
    record = RequestRecord(0, 4, 3, ttft_s=0.1, e2e_s=0.3, token_times_s=[0.1, 0.2, 0.3], usage_output_tokens=3)
    measured = summarize(LoadResult([record], 1.0), SLO(0.5, 0.06))
    for run in payload["runs"]:
        assert set(run) == {"system", "workload", "rate", "concurrency", "summary", "records"}
        assert set(run["summary"]) == set(measured) and set(run["summary"]["slo"]) == set(measured["slo"])
        assert len(run["records"]) == 30 and set(run["records"][0]) == set(record.to_json())
    assert [r["rate"] for r in payload["runs"]] == [1, 4, 64]
    assert payload["goodput"]["sim"]["chat"]["rates"] == [1, 4, 64]
    assert (tmp_path / "sweep.png").exists()


def test_same_requests_as_the_real_bench(profile_path, tmp_path):
    out = tmp_path / "r.json"
    assert main(sim_argv(profile_path, out, "--request-rate", "4", "--warmup-requests", "0", "--text", "synthetic")) == 0
    records = json.loads(out.read_text())["runs"][0]["records"]
    # the bench's first measured run; synthetic words are one token each, so prompt lengths are exact
    bench = generate_workload("chat", 30, 0, 0.1, salt=1, text="synthetic")
    assert [r["output_len"] for r in records] == [b.output_len for b in bench]
    assert [r["prompt_tokens"] for r in records] == [b.prompt_len for b in bench]
    assert all(r["output_tokens"] == r["output_len"] for r in records)


def test_streamed_statistics_equal_full_records():
    requests = generate_workload("chat", 40, 3, 0.1)
    slo = SLO(0.3, 0.05)
    results = []
    for keep in (True, False):
        sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 300), profile())
        sender = SimSender(sim, keep_token_times=keep, slo=slo)
        offsets = [i * 0.05 for i in range(len(requests))]
        summary = summarize(sender(None, requests, offsets=offsets), slo)
        run = {"summary": summary}
        sender.patch([run])
        results.append(run["summary"])
    full, streamed = results
    assert streamed["itl_ms"]["count"] == full["itl_ms"]["count"]
    for key in ("mean", "median", "p90", "p99"):  # gaps are counted to the microsecond
        assert streamed["itl_ms"][key] == pytest.approx(full["itl_ms"][key], abs=0.0005)
    assert streamed["slo"]["fluidity_index"] == pytest.approx(full["slo"]["fluidity_index"])
    assert streamed["ttft_ms"] == full["ttft_ms"] and streamed["slo"]["attainment"] == full["slo"]["attainment"]


def test_calibration_fits_a_synthetic_cost_exactly():
    rows = []

    class Recording(StepProfile):
        def step_seconds(self, plan, features=None):
            rows.append(plan_features(plan))
            return super().step_seconds(plan)

    sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128), 400),
                    Recording("linear", dict(COEFFICIENTS)))
    requests = to_sim_requests(generate_workload("chat", 60, 1, 0.3))
    sim.run(requests, offsets=[i * 0.02 for i in range(len(requests))])
    truth = [sum(COEFFICIENTS[name] * x for name, x in zip(FEATURES, row)) for row in rows]
    fitted = fit_linear(rows, truth)
    for name in FEATURES:
        assert fitted[name] == pytest.approx(COEFFICIENTS[name], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", ["cache_aware", "least_loaded", "round_robin"])
def test_every_router_is_the_clusters(name):
    """One implementation: --router builds the router `punctual serve --replicas` runs."""
    from punctual.cluster import router

    sim = Simulator(SimConfig(SchedulerConfig(), 200, cluster=ClusterConfig(3, router=name)), profile())
    assert type(sim.front.router) is router.ROUTERS[name]
    requests = to_sim_requests(generate_workload("chat", 9, 0, 0.1))
    outcomes, _ = sim.run(requests, offsets=[0.0] * 9)
    assert {o.replica for o in outcomes} == {0, 1, 2}  # a burst on idle replicas spreads under every router


def test_unknown_router_names_the_flag(profile_path, tmp_path):
    with pytest.raises(ValueError, match="router"):
        Simulator(SimConfig(SchedulerConfig(), 200, cluster=ClusterConfig(router="nope")), profile())
    with pytest.raises(SystemExit):
        main(sim_argv(profile_path, tmp_path / "x.json", "--router", "nope"))


def test_plan_finds_the_fewest_replicas(profile_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["sim", "plan", "--profile", str(profile_path), "--request-rate", "40", "--ttft-slo-ms", "300",
            "--tpot-slo-ms", "60", "--num-requests", "120", "--length-scale", "0.1", "--policies", "fcfs",
            "--budgets", "64", "--router", "least_loaded", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    cheapest = result["cheapest"]["replicas"]
    attained = {p["replicas"]: p["attainment"] for p in result["explored"]}
    assert attained[cheapest] >= 0.9 and (cheapest == 1 or attained[cheapest - 1] < 0.9)
    assert "explored" in capsys.readouterr().out


def test_hardware_profiles_are_estimates(tmp_path):
    out = tmp_path / "h100.json"
    assert main(["sim", "calibrate", "llama-3-8b", "--hardware", "h100", "--output", str(out)]) == 0
    from punctual.sim.profile import load_profile

    h100 = load_profile(out)
    assert h100.estimate and h100.kind == "roofline" and h100.kv_blocks(16) > 1000
    # Decode of one sequence is bandwidth-bound: about the weights' bytes over the derated bandwidth.
    one = h100.predict((1.0, 0, 1, 100, 100, 1))
    assert 0.005 < one < 0.012
    assert main(["sim", "calibrate", "llama-3-8b", "--hardware", "l4", "--output", str(out)]) == 0
    assert load_profile(out).predict((1.0, 0, 1, 100, 100, 1)) > 5 * one


@pytest.mark.slow  # runs the sweep in one process and in two
def test_split_across_processes_gives_the_same_runs(profile_path, tmp_path):
    """round_robin reads no replica state: shards in two processes answer exactly as one process."""
    runs = []
    for processes in ("1", "2"):
        out = tmp_path / f"p{processes}.json"
        assert main(sim_argv(profile_path, out, "--sweep-rates", "4,64", "--workload", "chat,shared-prefix",
                             "--replicas", "3", "--router", "round_robin", "--sim-processes", processes)) == 0
        runs.append(json.loads(out.read_text())["runs"])
    assert runs[0] == runs[1]
    assert main(sim_argv(profile_path, tmp_path / "x.json", "--replicas", "2", "--router", "least_loaded",
                         "--concurrency", "4", "--sim-processes", "2")) != 0  # a closed loop couples the replicas


@pytest.mark.parametrize("spread", [False, True])
def test_replica_by_replica_equals_one_interleaved_run(spread):
    """A shard simulates its replicas one after another; with routes fixed outside, every record
    (each token's time), the duration, the clock and the replicas' caches end as in one run; with
    a profile's spread too (each replica draws its steps' ratios from a stream of its own)."""
    from punctual.sim.shards import run_replica_by_replica
    from punctual.sim.spread import quantile_table

    tables = {"step_ratio": quantile_table([0.8, 1.0, 1.3] * 10), "admit_s": quantile_table([0.001, 0.02] * 15)}

    requests = to_sim_requests(generate_workload("shared-prefix", 60, 3, 0.2))
    offsets = [i * 0.01 for i in range(len(requests))]
    routes = [i % 4 for i in range(len(requests))]
    answers = []
    for by_replica in (False, True):
        config = SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 120, max_model_len=2048,
                           cluster=ClusterConfig(replicas=4, router="round_robin"))
        sender = SimSender(Simulator(config, profile(spread=tables if spread else None)))
        for _ in range(2):  # a second run starts from the first's clock and caches
            if by_replica:
                records, _, duration = run_replica_by_replica(sender, requests, offsets, routes)
            else:
                records, _, duration = sender.run_local(requests, offsets=offsets, routes=routes)
        sim = sender.simulator
        answers.append((records, duration, sim.now, sim.num_events, sim.num_steps,
                        [r.kv.num_used_blocks for r in sim.replicas]))
    assert answers[0][0] and all(r.error is None for r in answers[0][0])
    assert answers[0] == answers[1]


def pd_simulator(prefill: int, decode: int, transfer: dict | None = None, num_kv_blocks: int = 400):
    kv_transfer = transfer or {"fixed_s": 0.004, "bytes_per_s": 1e8}
    config = SimConfig(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128), num_kv_blocks,
                       max_model_len=1024, cluster=ClusterConfig(prefill + decode, prefill_replicas=prefill,
                                                                 decode_replicas=decode))
    return Simulator(config, profile(kv_transfer=kv_transfer))


def test_prefill_decode_moves_every_request_to_the_decode_pool():
    requests = to_sim_requests(generate_workload("chat", 40, 5, 0.1))
    sim = pd_simulator(1, 2)
    outcomes, _ = sim.run(requests, offsets=[i * 0.05 for i in range(len(requests))])
    assert len(outcomes) == 40 and all(o.error is None for o in outcomes)
    assert all(len(o.token_times) == o.request.output_len for o in outcomes)
    moved = [o for o in outcomes if o.moved_s is not None]
    assert sim.num_moves == len(moved) > 0 and sim.num_moves + sim.num_moves_refused >= \
        sum(o.request.output_len > 1 for o in outcomes) - sim.num_moves_refused
    assert {o.replica for o in moved} <= {1, 2}  # decoded in the decode pool
    for o in moved:  # it decoded on during the pre-copy, then paused for the stop-and-copy
        assert max(b - a for a, b in zip(o.token_times, o.token_times[1:])) >= 0.004
    for replica in sim.replicas:
        replica.scheduler.check_integrity()
        assert not replica.scheduler.requests and replica.kv.num_used_blocks == 0


def test_prefill_decode_is_deterministic_and_transfers_cost_time(profile_path, tmp_path):
    requests = to_sim_requests(generate_workload("chat", 30, 2, 0.1))
    offsets = [i * 0.05 for i in range(len(requests))]
    runs = []
    for transfer in ({"fixed_s": 0.004, "bytes_per_s": 1e8}, {"fixed_s": 0.004, "bytes_per_s": 1e8},
                     {"fixed_s": 0.05, "bytes_per_s": 1e6}):
        outcomes, _ = pd_simulator(1, 1, transfer).run(requests, offsets=offsets)
        runs.append(sorted((o.request.index, o.token_times) for o in outcomes))
    assert runs[0] == runs[1]
    def longest_pause(times):
        return max(b - a for a, b in zip(times, times[1:]))
    fast = [longest_pause(t) for _, t in runs[0] if len(t) > 2]
    slow = [longest_pause(t) for _, t in runs[2] if len(t) > 2]
    assert min(slow) >= 0.05  # the stop-and-copy's fixed cost shows as one pause per request
    assert sum(slow) / len(slow) > sum(fast) / len(fast) + 0.04


def test_prefill_decode_flags_need_both_and_a_transfer_cost(profile_path, tmp_path):
    with pytest.raises(ValueError, match="both"):
        Simulator(SimConfig(SchedulerConfig(), 100, cluster=ClusterConfig(prefill_replicas=1)), profile())
    with pytest.raises(ValueError, match="KV transfer"):
        Simulator(SimConfig(SchedulerConfig(), 100, cluster=ClusterConfig(2, prefill_replicas=1, decode_replicas=1)),
                  profile())
    out = tmp_path / "pd.json"
    assert main(sim_argv(profile_path, out, "--prefill-replicas", "1", "--decode-replicas", "1")) != 0


def test_plan_searches_the_prefill_decode_split(tmp_path, capsys):
    path = tmp_path / "profile.json"
    profile(kv_transfer={"fixed_s": 0.002, "bytes_per_s": 1e9}).save(path)
    out = tmp_path / "plan.json"
    argv = ["sim", "plan", "--profile", str(path), "--request-rate", "40", "--ttft-slo-ms", "300",
            "--tpot-slo-ms", "60", "--num-requests", "120", "--length-scale", "0.1", "--policies", "fcfs",
            "--budgets", "64", "--pd-splits", "0,0.5", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    splits = {(p["prefill_replicas"], p["decode_replicas"]) for p in result["explored"]}
    assert (0, 0) in splits and any(p > 0 and d > 0 for p, d in splits)
    assert {f["split"] for f in result["frontier"]} == {0.0, 0.5}
    assert "P+" in capsys.readouterr().out
