"""`sim validate --replicas N` / `--prefill-replicas P --decode-replicas D`: where the requests
went (per replica: requests routed, prefix-cache hit rate; with prefill/decode the KV moves and
their cost), read from a real cluster's /metrics, traces and /admin/migrations and from the
simulator, and compared; and the KV transfer cost a served cluster learned, kept as the profile's."""
from __future__ import annotations

import dataclasses
import json

import pytest

from punctual.engine.stats import EngineStats
from punctual.sim.move_cost import learned_from_cluster, learned_kv_transfer
from punctual.sim.validate_cluster import (WatchedServer, move_rows, parse_replica_metrics, price_move,
                                           requests_per_replica, routing_rows)
from tests.sim.test_speed_rescale import plan_and_config, served_profile, validate_args

KV_TRANSFER = {"fixed_s": 0.004, "bytes_per_s": 2e9}
MODEL = {"max_model_len": 2048, "kv_bytes_per_token": 4096}


def pd_profile():
    """A served profile whose model has a KV size and whose KV copies have a cost (P/D needs both)."""
    return dataclasses.replace(served_profile(), model=MODEL, kv_transfer=KV_TRANSFER)


def stats(queries: int, hits: int) -> EngineStats:
    return EngineStats(num_running=0, num_waiting=0, kv_blocks_total=100, kv_blocks_used=0, num_preemptions=0,
                       num_steps=0, prompt_tokens_computed=0, generation_tokens=0, prefix_cache_queries=queries,
                       prefix_cache_hits=hits)


def exposition(per_replica: dict[str, EngineStats] | EngineStats) -> str:
    """/metrics as `punctual serve --replicas` renders it (the server's own collector)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from punctual.server.metrics import EngineStatsCollector

    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: per_replica, lambda: True))
    return generate_latest(registry).decode()


def test_per_replica_prefix_counters_are_read_from_the_servers_own_exposition():
    text = exposition({"0": stats(400, 96), "1": stats(250, 0)})
    assert parse_replica_metrics(text) == {0: {"prefix_cache_queries": 400, "prefix_cache_hits": 96},
                                           1: {"prefix_cache_queries": 250, "prefix_cache_hits": 0}}
    assert parse_replica_metrics(exposition(stats(5, 5))) == {}  # one engine: no replica label


class FakeCluster:
    """/metrics and /admin/migrations of a two-replica cluster whose counters move as runs are sent."""

    def __init__(self):
        self.stats = {"0": stats(0, 0), "1": stats(0, 0)}
        self.moves: list[dict] = []

    def get(self, url: str) -> bytes:
        if url.endswith("/metrics"):
            return exposition(self.stats).encode()
        assert url.endswith("/admin/migrations"), url
        return json.dumps(self.moves).encode()

    def send(self, endpoint, requests, **kwargs):
        # each run: replica 0 looks up 100 prompt tokens and finds 60; replica 1 looks up 50, finds 0
        for replica, (queries, hits) in (("0", (100, 60)), ("1", (50, 0))):
            old = self.stats[replica]
            self.stats[replica] = dataclasses.replace(old, prefix_cache_queries=old.prefix_cache_queries + queries,
                                                      prefix_cache_hits=old.prefix_cache_hits + hits)
        self.moves.append({"ok": True, "reason": "disaggregation", "desc": kwargs.get("desc")})
        return "result"


def test_watched_server_keeps_each_measured_runs_deltas_and_moves_not_the_warm_ups():
    cluster = FakeCluster()
    watch = WatchedServer(cluster.send, "http://127.0.0.1:1/v1", get=cluster.get)
    assert watch.base_url == "http://127.0.0.1:1"  # the admin routes are not under /v1
    assert watch(None, [], desc="warm-up") == "result"
    assert watch(None, [], desc="chat 1 req/s") == "result"
    assert watch(None, [], desc="chat 2 req/s") == "result"
    assert len(watch.points) == 2
    for point, desc in zip(watch.points, ("chat 1 req/s", "chat 2 req/s")):
        assert point["prefix"] == {0: {"prefix_cache_queries": 100, "prefix_cache_hits": 60},
                                   1: {"prefix_cache_queries": 50, "prefix_cache_hits": 0}}
        assert [m["desc"] for m in point["moves"]] == [desc]  # only the moves of that run
        start, end = point["window"]
        assert start <= end
    assert watch.points[0]["window"][1] <= watch.points[1]["window"][0]


def test_requests_per_replica_counts_each_windows_traced_arrivals():
    adds = [[{"arrival": t} for t in (1.0, 2.0, 5.0)], [{"arrival": t} for t in (1.5, 6.0, 6.5)]]
    assert requests_per_replica(adds, (0.5, 3.0)) == {0: 2, 1: 1}
    assert requests_per_replica(adds, (4.0, 7.0)) == {0: 1, 1: 2}
    assert requests_per_replica(adds, (7.5, 9.0)) == {0: 0, 1: 0}


def run(replicas: dict, moves=None, rate=1.0) -> dict:
    return {"workload": "shared-prefix", "rate": rate, "cluster": {"replicas": replicas, "moves": moves or []}}


def test_routing_rows_compare_each_replicas_share_and_hit_rate():
    real = [run({0: {"requests": 30, "prefix_cache_queries": 1000, "prefix_cache_hits": 600},
                 1: {"requests": 10, "prefix_cache_queries": 400, "prefix_cache_hits": 100}})]
    # the simulated side as it comes back from an --output JSON: replica ids as strings
    sim = [run({"0": {"requests": 20, "prefix_cache_queries": 800, "prefix_cache_hits": 400},
                "1": {"requests": 20, "prefix_cache_queries": 0, "prefix_cache_hits": 0}})]
    rows = routing_rows(real, sim)
    assert [(r["replica"], r["requests_real"], r["requests_sim"]) for r in rows] == [(0, 30, 20), (1, 10, 20)]
    assert rows[0]["share_error"] == pytest.approx(0.5 - 0.75)
    assert rows[1]["share_error"] == pytest.approx(0.5 - 0.25)
    assert (rows[0]["hit_rate_real"], rows[0]["hit_rate_sim"]) == (pytest.approx(0.6), pytest.approx(0.5))
    assert (rows[1]["hit_rate_real"], rows[1]["hit_rate_sim"]) == (pytest.approx(0.25), None)  # no lookups
    with pytest.raises(ValueError, match="replicas"):
        routing_rows(real, [run({0: sim[0]["cluster"]["replicas"]["0"]})])


def test_balance_error_ranks_the_replicas_on_each_side():
    """A hot prefix put on replica 1 in the simulation and on replica 0 for real spreads the load
    alike: the balance error ranks the shares (60/0 against 0/60 is 0), the share error does not."""
    from punctual.sim.validate_cluster import balance_errors

    real = [run({0: {"requests": 60}, 1: {"requests": 0}}), run({0: {"requests": 41}, 1: {"requests": 19}}, rate=0.5)]
    sim = [run({0: {"requests": 0}, 1: {"requests": 60}}), run({0: {"requests": 17}, 1: {"requests": 43}}, rate=0.5)]
    rows = routing_rows(real, sim)
    assert max(abs(r["share_error"]) for r in rows) == pytest.approx(1.0)
    balance = balance_errors(rows)
    assert balance[("shared-prefix", 1.0)] == 0.0
    assert balance[("shared-prefix", 0.5)] == pytest.approx(2 / 60)


def test_move_rows_price_the_real_moves_at_the_profiles_transfer_cost():
    profile = pd_profile()
    block_bytes = 16 * MODEL["kv_bytes_per_token"]
    moves = [{"ok": True, "reason": "disaggregation", "precopy_blocks": 8, "final_blocks": 1, "transfer_s": 0.020},
             {"ok": True, "reason": "disaggregation", "precopy_blocks": 0, "final_blocks": 3, "transfer_s": 0.010},
             {"ok": False, "reason": "disaggregation", "precopy_blocks": 0, "final_blocks": 0, "transfer_s": 0.5}]
    first = 2 * 0.004 + 9 * block_bytes / 2e9  # a pre-copy round and the final one
    second = 0.004 + 3 * block_bytes / 2e9
    assert price_move(profile, moves[0], 16) == pytest.approx(first)
    rows = move_rows([run({}, moves)], [{"cluster": {"replicas": {}, "moves": {"disaggregation": 3}}}], profile, 16)
    (row,) = rows
    assert (row["moves_real"], row["moves_sim"]) == (2, 3)  # the refused move did not land
    assert row["transfer_ms_real"] == pytest.approx(15.0)
    assert row["transfer_ms_sim"] == pytest.approx((first + second) / 2 * 1000)
    assert row["price_error"] == pytest.approx(((first + second) / 2 - 0.015) / 0.015)


def test_learned_transfer_cost_prices_blocks_as_the_cluster_learned_them():
    block_bytes = 16 * MODEL["kv_bytes_per_token"]
    estimate = {"fixed_s": 0.012, "per_block_s": 0.0005, "observations": 9}
    moves = [{"ok": True, "estimate": {**estimate, "fixed_s": 1.0}}, {"ok": False, "estimate": {}},
             {"ok": True, "estimate": estimate}, {"ok": False, "estimate": {**estimate, "fixed_s": 2.0}}]
    learned = learned_kv_transfer(moves, block_bytes)
    assert learned["num_moves"] == 2
    assert learned_from_cluster(learned) and not learned_from_cluster(KV_TRANSFER) and not learned_from_cluster(None)
    profile = dataclasses.replace(pd_profile(), kv_transfer=learned)
    for blocks in (0, 1, 40):  # the latest landed move's fit, per block through the profile's own bytes
        assert profile.transfer_seconds(blocks, 16) == pytest.approx(0.012 + 0.0005 * blocks)
    assert learned_kv_transfer([{"ok": True, "estimate": {**estimate, "observations": 2}}], block_bytes) is None
    assert learned_kv_transfer([], block_bytes) is None


def test_learned_transfer_cost_splits_rounds_from_bytes_with_the_offline_bandwidth():
    """Moves of one size cannot separate a copy round's fixed cost from its bytes: with the
    offline copy's bandwidth for the bytes, the fixed part per round is what the moves took
    beyond them, and a longer move is priced as the cluster ran it (not 39 ms a block)."""
    block_bytes = 16 * MODEL["kv_bytes_per_token"]
    offline = {"fixed_s": 0.0015, "bytes_per_s": block_bytes / 0.0004}  # 0.4 ms a block in-process
    degenerate = {"fixed_s": 0.0, "per_block_s": 0.039, "observations": 300}
    moves = [{"ok": True, "precopy_blocks": 1, "final_blocks": 1, "transfer_s": 0.1008 + jitter,
              "estimate": degenerate} for jitter in (-0.01, 0.0, 0.0, 0.02)]
    moves.append({"ok": False, "precopy_blocks": 0, "final_blocks": 0, "transfer_s": 5.0})  # refused: not counted
    learned = learned_kv_transfer(moves, block_bytes, offline=offline)
    assert learned["fixed_s"] == pytest.approx(0.05)  # (100.8 ms - 2 x 0.4 ms) / 2 rounds
    profile = dataclasses.replace(pd_profile(), kv_transfer=learned)
    long_move = {"precopy_blocks": 16, "final_blocks": 1}
    assert price_move(profile, long_move, 16) == pytest.approx(0.05 * 2 + 0.0004 * 17)
    assert learned_kv_transfer(moves[:2], block_bytes, offline=offline) is None  # too few landed
    assert learned_kv_transfer(moves, block_bytes)["per_block_s"] == 0.039  # without it: the cluster's estimate


def test_pd_flags_reach_both_sides_and_bad_combinations_name_the_flags(tmp_path):
    from punctual.sim.validate import cluster_serve_args, engine_flags, server_args

    profile = pd_profile()
    args = validate_args(tmp_path, profile, prefill_replicas=1, decode_replicas=1)
    flags = engine_flags(args.serve_args, profile, args.replicas, args.router, 1, 1)
    assert (flags.replicas, flags.prefill_replicas, flags.decode_replicas) == (2, 1, 1)
    extra = server_args(args, flags)
    assert extra[-8:] == ("--prefill-replicas", "1", "--decode-replicas", "1", "--threads-per-replica", "1",
                          "--router", "cache_aware")
    assert "--replicas" not in extra
    with pytest.raises(ValueError, match="--prefill-replicas and --decode-replicas"):
        engine_flags("", profile, 1, "cache_aware", 1, 0)
    with pytest.raises(ValueError, match="--replicas: not with"):
        engine_flags("", profile, 2, "cache_aware", 1, 1)
    with pytest.raises(ValueError, match="--prefill-replicas and --decode-replicas"):
        cluster_serve_args(1, 1, "cache_aware", 0, 2)


def test_simulated_cluster_reports_where_the_shipped_router_sent_each_points_requests(tmp_path, capsys):
    """Two replicas under cache_aware on shared-prefix: every measured request is routed once
    (warm-ups left out), and the prefix caches hit; against itself the comparison reads zero."""
    from punctual.sim.validate import simulate, validate

    profile = served_profile()
    args = validate_args(tmp_path, profile, workload="shared-prefix", sweep_rates="2,4", num_requests=12,
                         replicas=2, router="cache_aware", sim_repeats=1)
    plan, config = plan_and_config(args, profile)
    runs = simulate(config, profile, plan, None, log=lambda _: None)
    hits = 0
    for point in runs:
        replicas = point["cluster"]["replicas"]
        assert set(replicas) == {0, 1}
        assert sum(r["requests"] for r in replicas.values()) == 12
        assert all(r["prefix_cache_hits"] <= r["prefix_cache_queries"] for r in replicas.values())
        hits += sum(r["prefix_cache_hits"] for r in replicas.values())
    assert hits > 0  # shared documents: the caches find them
    for point in runs:
        point["system"] = "punctual"
    (tmp_path / "measured.json").write_text(json.dumps({"measured": runs}, default=str))
    validate(dataclasses.replace(args, measured=str(tmp_path / "measured.json")), log=lambda _: None)
    out = json.loads((tmp_path / "out.json").read_text())
    routing = out["cluster"]["routing"]
    assert len(routing) == 2 * 2 and all(r["share_error"] == 0 for r in routing)
    printed = capsys.readouterr().out
    assert "within the targets" in printed and "hit rate real" in printed
    assert all(r["hit_rate_real"] == r["hit_rate_sim"] for r in routing)


def test_simulated_prefill_decode_pair_moves_every_request_to_the_decode_replica(tmp_path):
    from punctual.sim.validate import simulate

    profile = pd_profile()
    args = validate_args(tmp_path, profile, workload="chat", sweep_rates="2", num_requests=8,
                         prefill_replicas=1, decode_replicas=1, sim_repeats=1)
    from punctual.bench.cli import plan_from_args
    from punctual.sim.sizing import cluster_config
    from punctual.sim.validate import bench_args, engine_flags

    plan = plan_from_args(bench_args(args))
    config = cluster_config(engine_flags("", profile, 1, "cache_aware", 1, 1), profile, plan.slo)
    (point,) = simulate(config, profile, plan, None, log=lambda _: None)
    replicas = point["cluster"]["replicas"]
    assert (replicas[0]["requests"], replicas[1]["requests"]) == (8, 0)  # prompts only to the prefill replica
    multi_token = sum(1 for r in point["records"] if r["output_len"] > 1)
    assert point["cluster"]["moves"]["disaggregation"] == multi_token


@pytest.mark.slow  # a Ray cluster of two builtin-tiny replicas started and loaded: about a minute
@pytest.mark.parametrize("shape", ["cache_aware", "prefill_decode"])
def test_validate_reads_a_real_clusters_routing(tmp_path, shape):
    """The real path at its smallest: `sim validate` starts a two-replica cluster, and each point's
    per-replica requests (from the replicas' traces) add up to the point's requests on both sides;
    the prefix caches' lookups come from /metrics; with prefill/decode every prompt goes to the
    prefill replica and the moves that landed are read from /admin/migrations."""
    from punctual.sim.validate import validate

    pd = shape == "prefill_decode"
    profile = pd_profile()
    args = validate_args(tmp_path, profile, workload="chat" if pd else "shared-prefix", sweep_rates="4",
                         num_requests=6, model="builtin-tiny", sim_repeats=1, startup_timeout=300.0,
                         replicas=1 if pd else 2, prefill_replicas=int(pd), decode_replicas=int(pd))
    assert validate(args, log=lambda _: None) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    routing = out["cluster"]["routing"]
    assert [r["replica"] for r in routing] == [0, 1]
    assert sum(r["requests_real"] for r in routing) == sum(r["requests_sim"] for r in routing) == 6
    measured = out["measured"][0]["cluster"]["replicas"]
    if pd:
        assert [r["requests_real"] for r in routing] == [6, 0]
        (moves,) = out["cluster"]["moves"]
        assert 1 <= moves["moves_real"] <= 6 and moves["transfer_ms_real"] > 0
    else:
        assert sum(r["prefix_cache_queries"] for r in measured.values()) > 0
        assert sum(r["prefix_cache_hits"] for r in measured.values()) > 0  # the shared documents, warmed up
