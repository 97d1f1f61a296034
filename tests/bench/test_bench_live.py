"""End to end: `punctual bench` against a live Punctual server, and `bench compare` with the peers, on builtin-tiny."""
from __future__ import annotations

import json

import pytest

from punctual.bench.peers import PeerOptions, hf_static_peer, punctual_peer, free_port, running
from punctual.cli import main

pytestmark = pytest.mark.slow  # live servers and their peers, benchmarked end to end

TINY = ["--text", "synthetic", "--length-scale", "0.05", "--num-requests", "6", "--no-progress", "--warmup-requests", "1",
        "--ttft-slo-ms", "10000", "--tpot-slo-ms", "2000"]


@pytest.fixture(scope="module")
def punctual_server(tmp_path_factory):
    options = PeerOptions(max_num_seqs=8, threads=1, kv_cache_memory="64MiB")
    spec = punctual_peer("builtin-tiny", free_port(), options)
    with running(spec, tmp_path_factory.mktemp("logs") / "punctual.log", startup_timeout_s=120) as endpoint:
        yield endpoint


def test_bench_a_live_punctual_server(punctual_server, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(["bench", "--base-url", punctual_server.base_url, "--workload", "chat,multi-tenant",
               "--sweep-rates", "4,50", "--output", str(out), *TINY])
    assert rc == 0
    results = json.loads(out.read_text())
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        summary = run["summary"]
        assert summary["completed"] == summary["requests"] == 6, summary["errors"]
        assert summary["ttft_ms"]["p99"] > 0 and summary["tpot_ms"]["median"] > 0
        for record in run["records"]:
            assert record["output_tokens"] == record["output_len"]  # ignore_eos forced the length
            assert record["prompt_tokens"] >= record["prompt_len"]
    tenant_run = next(r for r in results["runs"] if r["workload"] == "multi-tenant")
    assert set(tenant_run["summary"]["per_user"]) <= {f"tenant-{i}" for i in range(4)}
    assert "server" in results["goodput"]
    assert (tmp_path / "results-chat.png").exists() and (tmp_path / "results-multi-tenant.png").exists()
    assert "goodput (req/s)" in capsys.readouterr().out


def test_static_batching_floor_streams_every_token(tmp_path):
    spec = hf_static_peer("builtin-tiny", free_port(), PeerOptions(max_num_seqs=4, threads=1))
    with running(spec, tmp_path / "hf.log", startup_timeout_s=120) as endpoint:
        from punctual.bench.loadgen import run
        from punctual.bench.workloads import generate_workload

        requests = generate_workload("chat", 6, seed=1, length_scale=0.05)
        result = run(endpoint, requests, concurrency=6, progress=False)
    assert all(r.ok for r in result.records), [r.error for r in result.records]
    for request, record in zip(requests, result.records):
        assert record.output_tokens == request.output_len
        assert record.finish_reason == "length"
    # static batching: at most 4 run together, so two requests wait for a whole batch to finish
    first_done = min(r.sent_s + r.e2e_s for r in result.records)
    assert sum(r.sent_s + r.ttft_s >= first_done for r in result.records) >= 2
