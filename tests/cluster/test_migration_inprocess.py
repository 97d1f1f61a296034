"""ClusterClient's migrations on replicas served in this process (ReplicaServer threads, no Ray):
refusals and failures on either side leave the stream identical and no KV block leaked."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import punctual.cluster.launch
from punctual.cluster.client import ClusterClient
from punctual.cluster.inprocess import InProcessReplicas
from punctual.config import ClusterConfig, EngineConfig
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from waiting import wait_until, wait_until_async

PROMPT = list(range(10, 47))
MAX_TOKENS = 160  # long enough that a loaded machine cannot finish a stream before the test moves it


@pytest.fixture(params=["relay", "direct"])
def cluster(monkeypatch, request):
    """Two replicas in this process; KV relayed by the front end, or through shared memory (the
    object store needs Ray actors: tests/cluster/test_kv_moves.py)."""
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=512, block_size=4)
    return ClusterClient(config, ClusterConfig(replicas=2, kv_transport=request.param))


def shared_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def request(request_id: str) -> EngineCoreRequest:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return EngineCoreRequest(request_id, list(PROMPT), params, arrival_time=0.0)


def collect_outputs(client: ClusterClient, tokens: dict[str, list[int]], finished: set[str]) -> None:
    """Route every output of `client` into `tokens` by request id; finished ids go to `finished`."""
    def on_update(update):
        for out in update.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished.add(out.request_id)

    client._on_update = on_update


async def generate(client: ClusterClient, request_id: str, move=None) -> list[int]:
    """Run one request to the end; `move(client)` is awaited once its 6th token arrived."""
    tokens: list[int] = []
    done = asyncio.Event()
    at_six = asyncio.Event()

    def on_update(update):
        for out in update.outputs:
            if out.request_id == request_id:
                tokens.extend(out.new_token_ids)
                if len(tokens) >= 6:
                    at_six.set()
                if out.finish_reason is not None:
                    done.set()

    client._on_update = on_update
    client.add_request(request(request_id))
    if move is not None:
        await asyncio.wait_for(at_six.wait(), 60)
        await move(client)
    await asyncio.wait_for(done.wait(), 60)
    return tokens


def replicas_idle() -> bool:
    """Every in-process replica holds no request and every KV block of its pool is free."""
    return all(not server.core.scheduler.requests and not server.core.kv_manager.block_tables
               and server.core.kv_manager.pool.num_free_blocks == server.core.kv_manager.pool.num_blocks
               for server in InProcessReplicas.servers)


def replica_state() -> str:
    return "; ".join(f"replica {i}: requests {list(server.core.scheduler.requests)}, block tables "
                     f"{list(server.core.kv_manager.block_tables)}, free blocks "
                     f"{server.core.kv_manager.pool.num_free_blocks} of {server.core.kv_manager.pool.num_blocks}"
                     for i, server in enumerate(InProcessReplicas.servers))


def run(cluster: ClusterClient, scenario) -> None:
    """Run `scenario` against the started cluster; then every replica must come to hold no request
    and no KV block (a block a move leaked never comes back: the wait fails naming it)."""
    errors = []

    async def main():
        # An exception in a socket callback is only logged by asyncio: make it fail the test.
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        cluster.start()
        await cluster.attach(lambda update: None, lambda reason: None)
        try:
            await scenario(cluster)
            # Every stream has finished: the replicas go idle (and check their integrity) while connected.
            await wait_until_async(replicas_idle, message=lambda: f"a replica is not idle: {replica_state()}")
        finally:
            await cluster.shutdown()

    asyncio.run(main())
    assert not errors, errors
    wait_until(replicas_idle, message=lambda: f"a replica is not idle after the shutdown: {replica_state()}")
    for server in InProcessReplicas.servers:
        server.core.check_integrity()


def test_migrations_and_refusals_keep_the_stream_identical(cluster, monkeypatch):
    results = {}
    segments_before = shared_segments()

    async def scenario(client: ClusterClient):
        results["reference"] = await generate(client, "ref")

        async def moved(c):
            source = c.requests["moved"].replica_id
            results["moved_ok"] = await c.migrate("moved", 1 - source, "test")
            results["moved_to"] = (source, c.requests["moved"].replica_id)

        results["moved"] = await generate(client, "moved", moved)

        async def refused(c):  # the target has no room: it goes on at the source
            source = c.requests["refused"].replica_id
            target_core = InProcessReplicas.servers[1 - source].core
            monkeypatch.setattr(target_core, "reserve_import", lambda request_id, num_blocks: False)
            results["refused_ok"] = await c.migrate("refused", 1 - source, "test")
            results["refused_at"] = (source, c.requests["refused"].replica_id)
            monkeypatch.undo()

        results["refused"] = await generate(client, "refused", refused)

        async def late(c):  # the target refuses the commit, after the source let go: recompute
            source = c.requests["late"].replica_id
            target_core = InProcessReplicas.servers[1 - source].core

            def refuse(state, first_block=0, payload=None):
                target_core.abort_import(state.core_request.request_id)
                return False

            monkeypatch.setattr(target_core, "commit_import", refuse)
            results["late_ok"] = await c.migrate("late", 1 - source, "test")
            results["late_at"] = (source, c.requests["late"].replica_id)
            monkeypatch.undo()

        results["late"] = await generate(client, "late", late)

    run(cluster, scenario)
    reference = results["reference"]
    assert len(reference) == MAX_TOKENS
    assert results["moved_ok"] and results["moved_to"][0] != results["moved_to"][1]
    assert results["moved"] == reference
    assert not results["refused_ok"] and results["refused_at"][0] == results["refused_at"][1]
    assert results["refused"] == reference
    assert not results["late_ok"] and results["late_at"][0] == results["late_at"][1]
    assert results["late"] == reference
    assert [m["ok"] for m in cluster.migrations] == [True, False, False]
    assert {m["transport"] for m in cluster.migrations} == {cluster.cluster.kv_transport}
    assert cluster.num_resumed == 1
    assert shared_segments() <= segments_before, "a shared-memory segment of a move was left behind"
    moved = cluster.migrations[0]
    assert moved["transfer_bytes"] > 0 and moved["estimate"]["observations"] >= 2


@pytest.mark.parametrize("migration", [True, False])
def test_room_for_a_more_important_request_moves_a_less_important_one(monkeypatch, migration):
    """--migration on: a priority-0 request comes to a replica whose KV its priority-5 stream would
    outgrow; the stream moves to the other replica instead of being preempted for it (off: the
    scheduler preempts it, which is what the move spares)."""
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    # `low` makes no token past its 6th until the scenario has added `high`: without that gate a
    # core thread holding the GIL could finish `low` first (seen once under CI's load), leaving
    # nothing to preempt or move. Each step also lets go of the interpreter for a moment, so that
    # the front end's move keeps up with the stream it moves.
    from punctual.engine.core import EngineCore

    step = EngineCore.step
    high_added = threading.Event()

    def gated_step(self, *args, **kwargs):
        low_request = self.scheduler.requests.get("low")
        if low_request is not None and len(low_request.output_token_ids) >= 6:
            high_added.wait(timeout=30)  # no assert here: an exception in a replica's thread ends the process
        outputs = step(self, *args, **kwargs)
        time.sleep(0.001)
        return outputs

    monkeypatch.setattr(EngineCore, "step", gated_step)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=64, block_size=4,
                                      scheduling_policy="priority")
    # A threshold no load gap reaches: only the room rule moves anything.
    client = ClusterClient(config, ClusterConfig(replicas=2, migration=migration, migration_threshold=1000))
    low = list(range(10, 150))  # 140 prompt tokens + 80 generated: 55 of the 64 blocks
    high = list(range(200, 300))  # 100 + 40: 35 blocks; both together need 90
    tokens: dict[str, list[int]] = {}

    def make(request_id, prompt, max_tokens, priority):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return EngineCoreRequest(request_id, list(prompt), params, arrival_time=0.0, priority=priority)

    async def scenario(c: ClusterClient):
        finished = set()

        collect_outputs(c, tokens, finished)
        for request_id, prompt, max_tokens in (("solo-low", low, 80), ("solo-high", high, 40)):
            c.add_request(make(request_id, prompt, max_tokens, 0))
            await wait_until_async(lambda: request_id in finished, timeout=60, message=f"{request_id} unfinished")
        monkeypatch.setattr(c.ledger, "route", lambda request: c.replicas[0])  # both come to replica 0
        c.add_request(make("low", low, 80, 5))
        await wait_until_async(lambda: len(tokens.get("low", [])) >= 6, message="low made no 6 tokens")
        c.add_request(make("high", high, 40, 0))
        high_added.set()
        await wait_until_async(lambda: {"low", "high"} <= finished, timeout=60, message=lambda: f"finished: {finished}")

    run(client, scenario)
    moves = [(m["request_id"], m["reason"], m["source"], m["target"], m["ok"]) for m in client.migrations]
    assert moves == ([("low", "priority", 0, 1, True)] if migration else []), client.migrations
    assert tokens["low"] == tokens["solo-low"] and tokens["high"] == tokens["solo-high"]
    preemptions = sum(server.core.scheduler.num_preemptions for server in InProcessReplicas.servers)
    assert (preemptions == 0) if migration else (preemptions > 0)


def test_rebalancing_moves_a_request_to_the_idle_replica(monkeypatch):
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=512, block_size=4)
    client = ClusterClient(config, ClusterConfig(replicas=2, migration=True, migration_threshold=2))
    tokens: dict[str, list[int]] = {}
    finished = set()

    async def scenario(c: ClusterClient):
        collect_outputs(c, tokens, finished)
        monkeypatch.setattr(c.ledger, "route", lambda request: c.replicas[0])  # a skewed router
        for i in range(3):
            c.add_request(request(f"r{i}"))
        await wait_until_async(lambda: len(finished) == 3, timeout=60, message=lambda: f"finished: {finished}")

    run(client, scenario)
    moves = [m for m in client.migrations if m["ok"]]
    assert moves and moves[0]["reason"] == "rebalance" and (moves[0]["source"], moves[0]["target"]) == (0, 1)
    assert tokens["r0"] == tokens["r1"] == tokens["r2"] and len(tokens["r0"]) == MAX_TOKENS


def test_int8_transfer_moves_and_leaks_nothing(monkeypatch):
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=512, block_size=4)
    client = ClusterClient(config, ClusterConfig(replicas=2, kv_transfer_int8=True))
    results = {}

    async def scenario(c: ClusterClient):
        async def moved(c):
            results["ok"] = await c.migrate("q", 1 - c.requests["q"].replica_id, "test")

        results["tokens"] = await generate(c, "q", moved)

    run(client, scenario)
    assert results["ok"] and len(results["tokens"]) == MAX_TOKENS  # lossy: the text may differ


def test_concurrent_streams_each_moved_match_their_solo_runs(monkeypatch):
    """Four streams decoding together, each moved while the others keep going (and moving)."""
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=128, block_size=4)
    client = ClusterClient(config, ClusterConfig(replicas=2))
    prompts = {f"c{i}": [(i * 31 + 7 * j) % 500 + 3 for j in range(20 + 9 * i)] for i in range(4)}
    solo: dict[str, list[int]] = {}
    together: dict[str, list[int]] = {}

    async def scenario(c: ClusterClient):
        finished = set()

        def on_update(update):
            for out in update.outputs:
                target = solo if out.request_id.startswith("solo") else together
                target.setdefault(out.request_id.removeprefix("solo-"), []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finished.add(out.request_id)

        c._on_update = on_update
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for request_id, prompt in prompts.items():
            c.add_request(EngineCoreRequest(f"solo-{request_id}", list(prompt), params, arrival_time=0.0))
            await wait_until_async(lambda: f"solo-{request_id}" in finished, timeout=60,
                                   message=f"solo-{request_id} unfinished")
        for request_id, prompt in prompts.items():
            c.add_request(EngineCoreRequest(request_id, list(prompt), params, arrival_time=0.0))
        moves: dict[str, asyncio.Task] = {}

        def move_due_streams() -> bool:
            """Start each stream's move once it has its share of tokens; True once all finished."""
            for request_id in prompts:
                routed = c.requests.get(request_id)
                if routed is not None and len(routed.delivered) >= 6 + 3 * int(request_id[1:]) and request_id not in moves:
                    moves[request_id] = asyncio.ensure_future(c.migrate(request_id, 1 - routed.replica_id, "test"))
            return len(finished) == 2 * len(prompts)

        await wait_until_async(move_due_streams, timeout=60, interval=0.002, message=lambda: f"finished: {finished}")
        await asyncio.gather(*moves.values())  # kept: a move's failure fails the test

    run(client, scenario)
    assert sum(m["ok"] for m in client.migrations) == len(prompts), client.migrations
    assert together == solo


def test_drain_moves_running_requests_and_resubmits_waiting_ones(monkeypatch):
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=1)
    client = ClusterClient(config, ClusterConfig(replicas=2))
    tokens: dict[str, list[int]] = {}
    drained = {}

    async def scenario(c: ClusterClient):
        finished = set()

        collect_outputs(c, tokens, finished)
        real_route = c.ledger.route
        monkeypatch.setattr(c.ledger, "route", lambda request: c.replicas[0])  # all on replica 0: one runs, two wait
        for i in range(3):
            c.add_request(request(f"d{i}"))
        await wait_until_async(lambda: len(tokens.get("d0", [])) >= 6, message="d0 made no 6 tokens")
        monkeypatch.setattr(c.ledger, "route", real_route)
        drained.update(await c.drain(0))
        await wait_until_async(lambda: len(finished) == 3, timeout=60, message=lambda: f"finished: {finished}")
        drained["info"] = c.replica_info()

    run(client, scenario)
    assert {k: drained[k] for k in ("migrated", "recomputed", "left")} == {"migrated": 1, "recomputed": 2, "left": 0}
    assert [r["state"] for r in drained["info"]] == ["drained", "ready"]
    assert tokens["d0"] == tokens["d1"] == tokens["d2"] and len(tokens["d0"]) == MAX_TOKENS


def test_a_failed_rebalancing_move_is_logged_and_surfaced(monkeypatch, caplog):
    """A rebalancing move that raises (a bug, not a refusal) is a kept background task: its failure
    is logged and counted for GET /health, and the streams go on where they are."""
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=512, block_size=4)
    client = ClusterClient(config, ClusterConfig(replicas=2, migration=True, migration_threshold=2))
    tokens: dict[str, list[int]] = {}
    finished = set()

    async def broken_migrate(request_id, target_id, reason=""):
        raise RuntimeError("a bug in the mover")

    async def scenario(c: ClusterClient):
        collect_outputs(c, tokens, finished)
        monkeypatch.setattr(c.ledger, "route", lambda request: c.replicas[0])  # skewed: a rebalance is due
        monkeypatch.setattr(c.mover, "migrate", broken_migrate)
        for i in range(3):
            c.add_request(request(f"r{i}"))
        while len(finished) < 3:
            await asyncio.sleep(0.01)

    with caplog.at_level("ERROR", logger="punctual.engine.tasks"):
        run(client, scenario)
    failures = client.background_failures
    assert failures.by_task.get("rebalance", 0) >= 1 and set(failures.by_task) == {"rebalance"}
    assert "a bug in the mover" in failures.latest[-1].error
    assert any(r.getMessage() == "background task rebalance failed" for r in caplog.records)
    assert not client.migrations  # no move happened
    assert tokens["r0"] == tokens["r1"] == tokens["r2"] and len(tokens["r0"]) == MAX_TOKENS
