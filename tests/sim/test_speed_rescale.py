"""`sim validate --rescale-per-point`: a profile scaled by the machine's probed speed, the probe
record in the profile (old profiles without one still load), and the per-point simulation."""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from punctual.bench.workloads import generate_workload
from punctual.config import SchedulerConfig
from punctual.config import ClusterConfig
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.probe import calibration_probe, check_reference, probe_spec, speed_scale
from punctual.sim.profile import PREFILL_STEPS, Roofline, StepProfile, load_profile
from punctual.sim.validate import ValidateConfig

COEFFICIENTS = {"fixed": 0.02, "prefill_tokens": 4e-4, "decode_rows": 6e-4, "context_tokens": 1e-6,
                "attention_pairs": 2e-8, "sampled_rows": 1e-4, PREFILL_STEPS: 0.003}
REPO = Path(__file__).resolve().parents[2]
REFERENCE = {**probe_spec(), "token_s": 0.010, "rounds_token_s": [0.010]}


def served_profile(**extra) -> StepProfile:
    return StepProfile("linear", dict(COEFFICIENTS), num_kv_blocks=300, model={"max_model_len": 2048},
                       frontend={"admit_s": 0.001, "deliver_s": 0.005}, **extra)


def test_scaled_profile_prices_every_step_that_much_longer():
    x = (1.0, 37.0, 5.0, 900.0, 4000.0, 6.0)
    profile = served_profile()
    assert profile.scaled(2.0).predict(x) == pytest.approx(2 * profile.predict(x))
    assert profile.scaled(2.0).predict((1.0, 0.0, 3.0, 90.0, 90.0, 3.0)) == pytest.approx(
        2 * profile.predict((1.0, 0.0, 3.0, 90.0, 90.0, 3.0)))
    assert (profile.scaled(2.0).admit_s, profile.scaled(2.0).deliver_s) == (profile.admit_s, profile.deliver_s)
    assert profile.scaled(1.0).coefficients == profile.coefficients
    roof = StepProfile("roofline", roofline=Roofline(1e12, 1e11, flops_per=(1e6,) * 5, bytes_fixed=1e8,
                                                      bytes_per=(1e3,) * 5))
    assert roof.scaled(1.5).predict(x) == pytest.approx(1.5 * roof.predict(x))
    with pytest.raises(ValueError, match="positive"):
        profile.scaled(0.0)


def test_a_scaled_profile_doubles_a_lone_stream_tpot():
    """One request at a time: every step and so every TPOT twice as long; TTFT's front end stays."""
    profile = served_profile()
    sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 300), profile)
    plain, _ = sim.run(to_sim_requests(generate_workload("chat", 6, 3, 0.1, 1, "synthetic")), concurrency=1)
    sim.set_profile(profile.scaled(2.0))  # other text, same lengths: no prefix hit on the first run's prompts
    slow, _ = sim.run(to_sim_requests(generate_workload("chat", 6, 3, 0.1, 2, "synthetic")), concurrency=1)
    for a, b in zip(sorted(plain, key=lambda o: o.request.index), sorted(slow, key=lambda o: o.request.index)):
        tpot = (a.token_times[-1] - a.token_times[0]) / (len(a.token_times) - 1)
        slow_tpot = (b.token_times[-1] - b.token_times[0]) / (len(b.token_times) - 1)
        assert slow_tpot == pytest.approx(2 * tpot)
        front = profile.admit_s + profile.deliver_s
        assert b.token_times[0] - b.sent - front == pytest.approx(2 * (a.token_times[0] - a.sent - front))


def test_old_profile_without_a_probe_still_loads_and_says_it_cannot_rescale(tmp_path):
    old = load_profile(REPO / "benchmarks/results/sim_profile_smollm2_quiet.json")  # written before probes
    assert old.speed_probe is None and old.fit["server"]["num_steps"] > 0
    with pytest.raises(ValueError, match="cannot rescale"):
        check_reference(old.speed_probe)
    probed = served_profile(speed_probe=calibration_probe([{"token_s": 0.010}, {"token_s": 0.012}]))
    probed.save(tmp_path / "p.json")
    again = load_profile(tmp_path / "p.json")
    assert again.speed_probe == probed.speed_probe and again.speed_probe["token_s"] == pytest.approx(0.011)
    assert speed_scale(again.speed_probe, 0.0132) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="not this version"):
        speed_scale({**again.speed_probe, "output_tokens": 7}, 0.01)


def validate_args(tmp_path, profile: StepProfile, **changes) -> ValidateConfig:
    profile.save(tmp_path / "p.json")
    args = dict(profile=str(tmp_path / "p.json"), model="builtin", workload="chat,shared-prefix", sweep_rates="1,2",
                num_requests=6, seed=0, length_scale=0.1, ttft_slo_ms=2000.0, tpot_slo_ms=200.0, serve_args="",
                output=str(tmp_path / "out.json"), startup_timeout=1.0, measured=None, server_trace=None,
                rescale_per_point=False, sim_repeats=8)
    return ValidateConfig(**{**args, **changes})


def plan_and_config(args, profile):
    from punctual.bench.cli import plan_from_args
    from punctual.sim.sizing import cluster_config
    from punctual.sim.validate import bench_args, engine_flags

    plan = plan_from_args(bench_args(args))
    return plan, cluster_config(engine_flags(args.serve_args, profile, args.replicas, args.router), profile, plan.slo)


def test_per_point_path_at_scale_one_is_the_plain_path(tmp_path):
    from punctual.sim.validate import simulate

    profile = served_profile()
    plan, config = plan_and_config(validate_args(tmp_path, profile), profile)
    plain = simulate(config, profile, plan, None, log=lambda _: None)
    per_point = simulate(config, profile, plan, [1.0] * len(plain), log=lambda _: None)
    assert [r["speed_scale"] for r in per_point] == [1.0] * 4
    for a, b in zip(plain, per_point):
        assert (a["workload"], a["rate"], a["summary"], a["records"]) == \
               (b["workload"], b["rate"], b["summary"], b["records"])
    slowed = simulate(config, profile, plan, [1.0, 1.0, 1.0, 3.0], log=lambda _: None)
    assert slowed[:3] == per_point[:3]  # a point's scale reaches no other point
    assert slowed[3]["summary"]["tpot_ms"]["median"] > 2 * per_point[3]["summary"]["tpot_ms"]["median"]


def test_validate_rescales_each_point_from_its_probe(tmp_path):
    """`--measured` runs that carry probes: each point is simulated at its own probed speed, the
    factor kept per point; runs measured without probes are refused."""
    from punctual.sim.validate import simulate, validate

    profile = served_profile(speed_probe=REFERENCE)
    args = validate_args(tmp_path, profile, workload="chat", rescale_per_point=True)
    plan, config = plan_and_config(args, profile)
    measured = simulate(config, profile, plan, [1.0, 1.5], log=lambda _: None)  # a machine slower at 2 req/s
    for run, token_s in zip(measured, (0.010, 0.015)):
        run["system"] = "punctual"
        run["speed_probe"] = {"token_s": token_s}
    (tmp_path / "measured.json").write_text(json.dumps({"measured": measured}, default=str))
    lines: list[str] = []
    validate(dataclasses.replace(args, measured=str(tmp_path / "measured.json")), log=lines.append)
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["speed_scale"] for r in out["simulated"]] == pytest.approx([1.0, 1.5])
    assert [r["speed_scale"] for r in out["errors"]] == pytest.approx([1.0] * 4 + [1.5] * 4)
    assert all(r["error"] == pytest.approx(0.0) for r in out["errors"])  # the same speeds as "measured"
    assert any("steps x 1.500" in line for line in lines)
    for run in measured:
        del run["speed_probe"]
    (tmp_path / "measured.json").write_text(json.dumps({"measured": measured}, default=str))
    with pytest.raises(ValueError, match="no speed probe"):
        validate(dataclasses.replace(args, measured=str(tmp_path / "measured.json")), log=print)


def test_validate_refuses_to_rescale_a_profile_without_a_probe_before_starting_a_server(tmp_path):
    from punctual.sim.validate import validate

    args = validate_args(tmp_path, served_profile(), rescale_per_point=True)  # measured=None: would start one
    with pytest.raises(ValueError, match="cannot rescale"):
        validate(args, log=lambda _: None)


def test_probe_times_a_fixed_request_through_the_server():
    from punctual.bench.loadgen import Endpoint
    from punctual.sim.probe import OUTPUT_TOKENS, REPEATS, run_probe
    from tests.bench.test_bench_loadgen import fake_server

    transport, bodies, peak = fake_server(gap_s=0.002)
    probe = run_probe(Endpoint("http://fake"), transport=transport)
    assert len(bodies) == len(probe["token_samples_s"]) == REPEATS and peak[0] == 1  # one at a time
    assert {b["prompt"] for b in bodies} == {bodies[0]["prompt"]}  # the same request every time
    assert all(b["max_tokens"] == OUTPUT_TOKENS and b["ignore_eos"] and b["temperature"] == 0 for b in bodies)
    # Seconds per token, not per request: the median request's share of each of its tokens, each
    # token at least the fake server's gap, and the three requests fit in the probe's own wall time.
    samples = probe["token_samples_s"]
    assert probe["token_s"] == statistics.median(samples) and min(samples) >= 0.002
    assert sum(samples) * OUTPUT_TOKENS <= probe["seconds"]


def test_validate_a_two_replica_cluster(tmp_path):
    """--replicas: the server is started as a cluster with the same router, and the simulator runs
    that many replicas behind the shipped router; a one-replica simulation of the same plan differs."""
    from punctual.sim.validate import engine_flags, server_args, simulate, validate

    profile = served_profile()
    args = validate_args(tmp_path, profile, workload="chat", sweep_rates="8", num_requests=24, replicas=2,
                         threads_per_replica=1, router="cache_aware")
    flags = engine_flags(args.serve_args, profile, args.replicas, args.router)
    assert (flags.replicas, flags.router) == (2, "cache_aware")
    extra = server_args(args, flags)
    assert extra[-6:] == ("--replicas", "2", "--threads-per-replica", "1", "--router", "cache_aware")
    plan, config = plan_and_config(args, profile)
    assert (config.replicas, config.cluster.router) == (2, "cache_aware")
    two = simulate(config, profile, plan, None, log=lambda _: None)
    plan1, config1 = plan_and_config(validate_args(tmp_path, profile, workload="chat", sweep_rates="8",
                                                   num_requests=24), profile)
    one = simulate(config1, profile, plan1, None, log=lambda _: None)
    assert two[0]["summary"]["ttft_ms"]["p90"] < one[0]["summary"]["ttft_ms"]["p90"]  # twice the engines
    for run in two:
        run["system"] = "punctual"
    (tmp_path / "measured.json").write_text(json.dumps({"measured": two}, default=str))
    validate(dataclasses.replace(args, measured=str(tmp_path / "measured.json")), log=lambda _: None)
    out = json.loads((tmp_path / "out.json").read_text())
    assert all(r["error"] == pytest.approx(0.0) for r in out["errors"])  # the same cluster simulated again
