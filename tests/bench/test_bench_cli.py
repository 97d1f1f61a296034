"""The command line: flags validated with the field named, tables and plots from results."""
from __future__ import annotations

import json
import math

import pytest

from punctual.bench import report
from punctual.bench.cli import plan_from_args
from punctual.bench.plots import plot_sweep
from punctual.cli import build_parser


def parse(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_bench_and_demo_are_registered():
    args = build_parser().parse_args(["demo"])
    assert callable(args.func)
    args = parse("compare", "--systems", "punctual", "--sweep-rates", "1,2")
    assert args.func.__name__ == "cmd_compare" and args.model == "builtin"
    args = parse("--base-url", "http://h:1", "--model", "m")
    assert args.func.__name__ == "cmd_bench" and args.model == "m"


def test_plan_from_flags():
    plan = plan_from_args(parse("--workload", "chat,shared-prefix", "--sweep-rates", "0.5,1,2",
                                "--ttft-slo-ms", "1000", "--tpot-slo-ms", "100", "--burstiness", "2"))
    assert plan.workloads == ("chat", "shared-prefix") and plan.rates == (0.5, 1.0, 2.0)
    assert plan.slo.ttft_s == 1.0 and plan.slo.tpot_s == 0.1 and plan.burstiness == 2.0
    assert plan_from_args(parse()).rates == (math.inf,)
    assert plan_from_args(parse("--sweep-bisect", "1,8", "--ttft-slo-ms", "1", "--tpot-slo-ms", "1")).bisect == (1, 8)


@pytest.mark.parametrize("argv, field", [
    (["--workload", "chat,nope"], "--workload"),
    (["--ttft-slo-ms", "100"], "--tpot-slo-ms"),
    (["--sweep-rates", "1,x"], "--sweep-rates"),
    (["--sweep-rates", "1,-2"], "--sweep-rates"),
    (["--sweep-bisect", "4,2"], "--sweep-bisect"),
    (["--concurrency", "4", "--sweep-rates", "1,2"], "--concurrency"),
    (["--sweep-bisect", "1,4"], "--sweep-bisect"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
])
def test_bad_flags_name_the_field(argv, field):
    with pytest.raises(ValueError, match=field):
        plan_from_args(parse(*argv))


def test_sampling_flags_reach_every_request_body(monkeypatch):
    from punctual.bench import sweep
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.workloads import BenchRequest

    plan = plan_from_args(parse("--temperature", "1", "--top-k", "3", "--num-requests", "2",
                                "--warmup-requests", "0"))
    assert plan.temperature == 1.0 and plan.top_k == 3
    bodies = []

    class Sent(Exception):
        pass

    def fake_run(endpoint, requests, **kwargs):
        bodies.append(endpoint.body(BenchRequest("hi", 1, 4), "m"))
        raise Sent

    monkeypatch.setattr(sweep.loadgen, "run", fake_run)
    with pytest.raises(Sent):
        sweep.bench_endpoint(Endpoint("http://127.0.0.1:9"), plan, progress=False, log=lambda _: None)
    assert bodies[0]["temperature"] == 1.0 and bodies[0]["top_k"] == 3
    greedy = plan_from_args(parse("--num-requests", "2", "--warmup-requests", "0"))
    bodies.clear()
    with pytest.raises(Sent):
        sweep.bench_endpoint(Endpoint("http://127.0.0.1:9"), greedy, progress=False, log=lambda _: None)
    assert bodies[0]["temperature"] == 0.0 and "top_k" not in bodies[0]


def fake_run(system, rate, ttft, attainment):
    stats = lambda v: {"mean": v, "median": v, "p90": v * 1.5, "p99": v * 2, "count": 10}  # noqa: E731
    summary = {"requests": 10, "completed": 10, "failed": 0, "duration_s": 5.0, "request_throughput": 2.0,
               "output_throughput": 100.0, "ttft_ms": stats(ttft), "tpot_ms": stats(20.0), "itl_ms": stats(19.0),
               "e2e_ms": stats(ttft + 500), "errors": [],
               "slo": {"ttft_ms": 1000, "tpot_ms": 100, "attainment": attainment, "fluidity_index": 0.99}}
    return {"system": system, "workload": "chat", "rate": rate, "concurrency": None, "summary": summary}


def test_tables_json_and_plots(tmp_path):
    runs = [fake_run(s, r, 100 * r * (1 + i), a) for i, s in enumerate(["punctual", "llama.cpp"])
            for r, a in ((1.0, 1.0), (2.0, 0.95), (4.0, 0.5))]
    text = report.latency_table(runs[0]["summary"])
    assert "TTFT (ms)" in text and "attainment 100.0%" in text
    sweep = report.sweep_table(runs)
    assert sweep.count("\n") == len(runs) + 1 and "llama.cpp" in sweep
    goodput = report.goodput_table({"a": {"chat": {"goodput": None, "rates": [1.0, 2.0]}},
                                    "b": {"chat": {"goodput": 2.0, "rates": [1.0, 2.0]}},
                                    "c": {"chat": {"goodput": 1.0, "rates": [1.0, 2.0]}}})
    assert "< 1" in goodput and ">= 2" in goodput and goodput.splitlines()[-1].split() == ["c", "1"]
    out = tmp_path / "r.json"
    report.write_json(out, {"runs": [fake_run("x", math.inf, 1.0, 1.0)]})
    assert json.loads(out.read_text())["runs"][0]["rate"] == "inf"
    files = plot_sweep(runs, tmp_path / "sweep.png")
    assert files == [tmp_path / "sweep.png"] and files[0].stat().st_size > 10_000
    assert files[0].read_bytes()[:4] == b"\x89PNG"


def test_an_unavailable_peer_says_why(monkeypatch):
    from punctual.bench import llama_cpp, peers

    monkeypatch.setattr(llama_cpp, "server_binary", lambda: None)
    with pytest.raises(peers.PeerUnavailable, match="build-llama-cpp"):
        peers.peer_spec("llama.cpp", "builtin-tiny", peers.PeerOptions())
    monkeypatch.setattr(peers, "find_spec", lambda name: None)
    with pytest.raises(peers.PeerUnavailable, match="punctual.server"):
        peers.peer_spec("punctual", "builtin-tiny", peers.PeerOptions())
    with pytest.raises(ValueError, match="systems"):
        peers.peer_spec("vllm", "builtin-tiny", peers.PeerOptions())


def test_system_variants_become_their_own_systems(monkeypatch):
    from punctual.bench import peers

    spec = peers.peer_spec("punctual:int8", "builtin-tiny", peers.PeerOptions())
    assert spec.name == "punctual:int8" and spec.command[-2:] == ["--quantization", "int8"]
    assert peers.peer_spec("punctual:eager", "builtin-tiny", peers.PeerOptions()).command[-1] == "--enforce-eager"
    with pytest.raises(ValueError, match="no variant 'int3'"):
        peers.peer_spec("punctual:int3", "builtin-tiny", peers.PeerOptions())
    with pytest.raises(ValueError, match="q4_0"):
        peers.check_system("llama.cpp:q5_9")
