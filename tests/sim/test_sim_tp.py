"""Tensor parallelism in the simulator's cost model and `punctual sim plan --hardware`."""
from __future__ import annotations

import json
import math

import pytest

from punctual.cli import main
from punctual.sim.hardware import Hardware, model_shape, roofline_profile
from punctual.sim.profile import StepProfile, load_profile
from punctual.sim.tensor_parallel import Link, decode_features, load_link, rank_costs, tp_roofline
from punctual.sim.tp_plan import TPPlanConfig, evaluate, plan_tensor_parallel, search

SHAPE = model_shape("llama-2-70b")
GiB = 1 << 30
DECODE = decode_features(4, 1024)
PREFILL = (1.0, 512.0, 0.0, 512.0, 512 * 256.5, 1.0)  # one 512-token prompt chunk, sampled once
MACHINE = Hardware("test machine", 1e12, 40e9, 16 * GiB, 0.8, 0.7, 0.0, 2)  # no per-step overhead


def rank_roofline(ranks: int, link: Link | None):
    return tp_roofline(rank_costs(SHAPE, ranks, 0.5625, 2, 2), MACHINE, link)


def test_more_ranks_less_work_per_rank_more_collective_time():
    link = Link(100e-6, 1.25e9)
    costs = [rank_costs(SHAPE, n, 2, 2, 2) for n in (1, 2, 4, 8, 16)]
    for fewer, more in zip(costs, costs[1:]):
        assert more.read_weight_bytes == pytest.approx(fewer.read_weight_bytes / 2)
        assert more.layer_flops_per_token == pytest.approx(fewer.layer_flops_per_token / 2)
        assert more.resident_weight_bytes < fewer.resident_weight_bytes
    # 8 KV heads: split up to 8 ranks, then one replicated head per rank.
    kv = [c.kv_bytes_per_token for c in costs]
    assert kv[1] == kv[0] / 2 and kv[3] == kv[0] / 8 and kv[4] == kv[3]
    collectives = [rank_roofline(n, link).collective_seconds(DECODE) for n in (1, 2, 4, 8, 16)]
    assert collectives[0] == 0.0
    assert all(a < b for a, b in zip(collectives, collectives[1:]))
    ring = Link(100e-6, 1.25e9, "ring")
    assert [rank_roofline(n, ring).collective_seconds(DECODE) for n in (2, 8)] == sorted(
        rank_roofline(n, ring).collective_seconds(DECODE) for n in (2, 8))


def test_star_pays_latency_twice_ring_pays_it_per_round():
    star, ring = Link(1e-3, 1e9, "star"), Link(1e-3, 1e9, "ring")
    for n in (2, 4, 8, 16):
        assert star.allreduce_seconds(0, n) == pytest.approx(2e-3)  # gather to the hub, broadcast back
        assert ring.allreduce_seconds(0, n) == pytest.approx(2 * (n - 1) * 1e-3)
        # Bytes: the hub's link carries N - 1 copies each way; a ring's links 2 (N - 1) / N of one.
        assert star.allreduce_seconds(1e6, n) - star.allreduce_seconds(0, n) > \
            ring.allreduce_seconds(1e6, n) - ring.allreduce_seconds(0, n)


@pytest.mark.parametrize("features", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_free_link_gives_one_nth_of_the_step(features):
    free = Link(0.0, math.inf)
    single = rank_roofline(1, None).predict(features)
    for n in (2, 4, 8):
        assert rank_roofline(n, free).predict(features) == pytest.approx(single / n, rel=1e-9)
    assert rank_roofline(8, Link(50e-6, 1.25e9)).predict(features) > single / 8


def test_roofline_with_collectives_round_trips_through_json(tmp_path):
    profile = roofline_profile("llama-2-70b", "cpu-4c", tensor_parallel_size=8, link=Link(2e-4, 1.25e9),
                               quantization="int4")
    path = tmp_path / "tp.json"
    profile.save(path)
    loaded = load_profile(path)
    assert loaded.predict(DECODE) == profile.predict(DECODE)
    assert loaded.roofline.collective_seconds(DECODE) > 0
    assert loaded.machine["tensor_parallel_size"] == 8
    # A profile written before tensor parallelism (no collective fields) still loads, priced as one rank.
    data = json.loads(path.read_text())
    for key in ("allreduce_fixed_s", "allreduce_per_row_s", "gather_fixed_s", "gather_per_row_s"):
        del data["roofline"][key]
    assert StepProfile.from_json(data).roofline.collective_seconds(DECODE) == 0.0


def test_a_rank_whose_weights_do_not_fit_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="does not fit.*raise --tensor-parallel-size"):
        roofline_profile("llama-2-70b", "cpu-4c", tensor_parallel_size=2, link=Link(1e-4, 1e9), quantization="int4")
    with pytest.raises(ValueError, match="give the link"):
        roofline_profile("llama-2-70b", "cpu-4c", tensor_parallel_size=8, quantization="int4")
    with pytest.raises(ValueError, match="does not divide the model's 64 attention heads"):
        roofline_profile("llama-2-70b", "cpu-4c", tensor_parallel_size=3, link=Link(1e-4, 1e9))


def config(**kw) -> TPPlanConfig:
    return TPPlanConfig(**{"model": "llama-2-70b", "hardware": "cpu-4c", "tpot_slo_ms": 200.0,
                           "quantization": "int4", **kw})


def test_plan_picks_the_smallest_group_that_fits_and_meets_the_tpot():
    # A TPOT nobody misses: the answer is memory alone. 70B int4 is ~39 GB: 2 x 16 GiB is too few.
    [(_, best, tried)] = search(config(tpot_slo_ms=1e6, link_latencies_us=(100.0,)))
    assert best["ranks"] == 4 and [p["fits"] for p in tried] == [False, False, True]
    [(_, best, _)] = search(config(tpot_slo_ms=1e6, link_latencies_us=(100.0,), machine_memory=64 * GiB))
    assert best["ranks"] == 1
    # At 200 ms: the answer meets it, and the next smaller group does not (or does not fit).
    answers = search(config(link_latencies_us=(0.0, 50.0)))
    for link, best, tried in answers:
        assert best is not None and best["tpot_ms"] <= 200
        smaller = evaluate(config(), link, best["ranks"] // 2)
        assert not smaller["fits"] or smaller["tpot_ms"] > 200
        assert all(not p["meets"] for p in tried[:-1])
    # A slower link never needs fewer machines.
    assert answers[0][1]["ranks"] <= answers[1][1]["ranks"]


def test_plan_refuses_impossible_asks_saying_why(capsys):
    # 2 x 80 all-reduces a token at 1 ms each way: over 200 ms in collectives alone.
    assert plan_tensor_parallel(config(link_latencies_us=(1000.0,))) == 1
    assert "no group of 1, 2, 4, 8, 16, 32, 64 machines meets TPOT 200 ms" in capsys.readouterr().out
    assert plan_tensor_parallel(config(link_latencies_us=(1000.0,), machine_memory=GiB,
                                       tensor_parallel_sizes=(1, 2))) == 1
    assert "none fits in memory" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 does not divide"):
        search(config(tensor_parallel_sizes=(1, 3)))
    with pytest.raises(ValueError, match="--link-latency-us must be >= 0"):
        search(config(link_latencies_us=(-1.0,)))
    with pytest.raises(ValueError, match="--hardware: unknown 'cpu-5c'"):
        search(config(hardware="cpu-5c"))


def test_measured_link_replaces_the_given_latencies(tmp_path):
    path = tmp_path / "link.json"
    path.write_text(json.dumps({"latency_s": 3e-4, "bytes_per_s": 1e9, "source": "test"}))
    link = load_link(path)
    assert (link.latency_s, link.bytes_per_s) == (3e-4, 1e9)
    [(used, _, _)] = search(config(link_profile=str(path)))
    assert used == link
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a link measurement"):
        load_link(path)


def test_cli_answers_the_70b_question(capsys, tmp_path):
    argv = ["sim", "plan", "--hardware", "cpu-4c", "--model", "llama-2-70b", "--tpot-slo-ms", "200",
            "--quantization", "int4", "--link-latency-us", "50,200,1000"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for latency in ("50", "200", "1000"):
        assert f"link latency {latency} us: " in out
    assert "machine(s), TPOT" in out
    # The chosen group as a profile the simulator runs under a request rate.
    profile = tmp_path / "tp8.json"
    assert main(["sim", "calibrate", "llama-2-70b", "--hardware", "cpu-4c", "--tensor-parallel-size", "8",
                 "--quantization", "int4", "--link-latency-us", "50", "--output", str(profile)]) == 0
    assert load_profile(profile).roofline.allreduce_fixed_s == pytest.approx(2 * 80 * 2 * 50e-6)
    capsys.readouterr()
    assert main(["sim", "plan", "--tpot-slo-ms", "200"]) != 0
    assert "--profile, --request-rate, --ttft-slo-ms required" in capsys.readouterr().err


@pytest.mark.slow  # two gloo processes (~3 s)
def test_allreduce_calibration_measures_a_link(tmp_path):
    from punctual.sim.calibrate_link import measure_allreduce, save_link

    measured = measure_allreduce((1024, 1 << 18), iterations=5, log=lambda _: None)
    assert measured["latency_s"] > 0 and measured["bytes_per_s"] > 0
    assert len(measured["seconds"]) == 2
    save_link(measured, tmp_path / "link.json")
    link = load_link(tmp_path / "link.json")
    # The star all-reduce of two ranks on that link takes what was measured at the largest size (the fit's line).
    assert link.allreduce_seconds(1 << 18, 2) == pytest.approx(
        measured["allreduce_fixed_s"] + (1 << 18) * measured["allreduce_per_byte_s"])
