"""The simulator makes the real engine's scheduling decisions, step by step.

A real EngineCore on builtin-tiny runs on a fake clock that each step advances by the profile's
cost of its plan; the simulator runs the same requests with the same profile. Every plan (which
requests, how many tokens each) and every preemption must be the same, in the same order.

Across replicas, the simulator records each routing decision, prefill/decode placement and
rebalancing decision with the replicas' state as the front end counts it; a ClusterClient (no
replicas started) put in the same state makes the same choices through its own code path.
"""
from __future__ import annotations

import pytest

from punctual.bench.arrivals import arrival_offsets
from punctual.bench.workloads import generate_workload
from punctual.config import EngineConfig
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.config import ClusterConfig
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import StepProfile

COEFFICIENTS = {"fixed": 0.01, "prefill_tokens": 3e-4, "decode_rows": 5e-4, "context_tokens": 2e-6,
                "attention_pairs": 1e-8, "sampled_rows": 1e-4}


def shape(plan):
    return [(s.request_id, s.num_new_tokens) for s in plan.scheduled], sorted(r.request_id for r in plan.preempted)


def engine_plans(config: EngineConfig, requests, offsets, profile: StepProfile) -> list:
    from punctual.engine.core import EngineCore

    now = [0.0]
    core = EngineCore(config, clock=lambda: now[0])
    plans = []
    execute = core.runner.execute

    def timed(plan):
        plans.append(shape(plan))
        output = execute(plan)
        now[0] += profile.step_seconds(plan)  # the step takes what the simulator will charge
        return output
    core.runner.execute = timed
    pending = list(zip(offsets, requests))
    while pending or core.has_unfinished_requests():
        if not core.has_unfinished_requests() and pending[0][0] > now[0]:
            now[0] = pending[0][0]  # idle until the next arrival
        while pending and pending[0][0] <= now[0]:
            arrival, request = pending.pop(0)
            core.add_request(EngineCoreRequest(f"1-{request.index}", list(request.prompt_token_ids),
                                               SamplingParams(max_tokens=request.output_len, ignore_eos=True,
                                                              temperature=0.0), arrival_time=arrival))
        core.step()
        core.check_integrity()
    return plans


def sim_plans(config: EngineConfig, requests, offsets, profile: StepProfile) -> list:
    plans = []

    class Recording(StepProfile):
        def step_seconds(self, plan, features=None):
            plans.append(shape(plan))
            return profile.step_seconds(plan, features)

    recording = Recording("linear", dict(COEFFICIENTS))
    sim = Simulator(SimConfig(config.scheduler, config.cache.num_kv_blocks, config.cache.block_size,
                                  config.cache.enable_prefix_caching, 1024), recording)
    outcomes, _ = sim.run(requests, offsets=offsets)
    assert all(o.error is None for o in outcomes)
    sim.replicas[0].scheduler.check_integrity()
    return plans


@pytest.mark.parametrize("workload, policy, rate, scale", [("chat", "fcfs", 40.0, 0.15),
                                                           ("shared-prefix", "sjf", 20.0, 0.05),
                                                           ("chat", "slo", float("inf"), 0.08)])
def test_plans_match_the_engine_step_by_step(workload, policy, rate, scale):
    # A small pool and budget: chunked prefills, prefix hits, preemptions and recomputation all happen.
    config = EngineConfig.from_kwargs("builtin-tiny", num_kv_blocks=28, block_size=4, max_num_seqs=6,
                                      max_num_batched_tokens=24, scheduling_policy=policy,
                                      default_ttft_slo_ms=400.0, default_tpot_slo_ms=40.0)
    # Synthetic words: their stand-in ids fall inside builtin-tiny's vocabulary.
    requests = to_sim_requests(generate_workload(workload, 12, 7, scale, text="synthetic"))
    offsets = arrival_offsets(len(requests), rate, seed=7)
    profile = StepProfile("linear", dict(COEFFICIENTS))
    expected = engine_plans(config, requests, offsets, profile)
    got = sim_plans(config, requests, offsets, profile)
    assert any(preempted for _, preempted in expected) or policy != "fcfs"
    assert got == expected


# ---- routing and placement: the cluster client's code path and the simulator's -------------------
def _record_decisions(sim):
    """Wrap the simulator's routing, prefill/decode placement and rebalancing so that each records
    the replicas' state as the front end counts it, the block events since the last decision, the
    request and the choice."""
    log, events = [], []
    front, router = sim.front, sim.front.router
    stored, evicted = router.on_blocks_stored, router.on_blocks_evicted
    router.on_blocks_stored = lambda rid, hashes: (events.append(("stored", rid, list(hashes))), stored(rid, hashes))
    router.on_blocks_evicted = lambda rid, hashes: (events.append(("evicted", rid, list(hashes))),
                                                    evicted(rid, hashes))

    def state():
        in_flight = sim._in_flight
        return [([(i, in_flight[i].started, in_flight[i].prompt_tokens, len(in_flight[i].token_times),
                   in_flight[i].request.output_len, in_flight[i].migrating) for i in sorted(r.front_ids)],
                 r.kv_blocks_free(), r.kv.num_blocks, r.step_s) for r in sim.replicas]

    route, to_decode, rebalance, start_move = front.route, sim._to_decode, sim._maybe_rebalance, sim._start_move
    moves = []
    sim._start_move = lambda *args: (moves.append(args[:3]), start_move(*args))

    def routed(prompt, user):
        entry = ["route", state(), list(events), (list(prompt), user)]
        events.clear()
        entry.append(route(prompt, user))
        log.append(entry)
        return entry[-1]

    def placed(request_id, source, now):
        entry = ["decode", state(), list(events), request_id]
        events.clear()
        moves.clear()
        to_decode(request_id, source, now)
        log.append(entry + [moves[0][2] if moves else None])

    def rebalanced(now):
        entry = ["rebalance", state(), list(events), None]
        events.clear()
        moves.clear()
        rebalance(now)
        log.append(entry + [moves[0][:3] if moves else None])
    front.route, sim._to_decode, sim._maybe_rebalance = routed, placed, rebalanced
    return log


def _replay(log, cluster, profile, block_size, monkeypatch):
    """Each decision again, by ClusterClient on the same state: its choices."""
    import asyncio
    from types import SimpleNamespace

    import punctual.cluster.launch
    from punctual.cluster.client import ClusterClient, RoutedRequest
    from punctual.cluster.inprocess import InProcessReplicas
    from punctual.cluster.migration import TransferCost

    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    client = ClusterClient(EngineConfig.from_kwargs("builtin-tiny", block_size=block_size,
                                                    prefix_caching_hash_algo=SimConfig.hash_algo), cluster)
    client.replica_set.info = SimpleNamespace(max_model_len=1 << 30)
    per_block = block_size * profile.model["kv_bytes_per_token"] / profile.kv_transfer["bytes_per_s"]
    for transport in ("relay", "object-store", "direct"):
        client.channel.transfer_costs[transport] = TransferCost(fixed_s=profile.kv_transfer["fixed_s"], per_block_s=per_block)
    chosen = []

    async def migrate(request_id, target, reason=""):
        chosen.append((request_id, client.requests[request_id].replica_id, target))
    client.mover.migrate = migrate

    async def decide(kind, request):
        if kind == "route":
            prompt, user = request
            params = SamplingParams(max_tokens=1)
            return client.ledger.route(EngineCoreRequest(f"x{len(chosen)}", prompt, params, user=user)).replica_id
        chosen.clear()
        if kind == "decode":
            await client.placement._to_decode(request)
            return chosen[0][2] if chosen else None
        client.placement.maybe_rebalance()
        await asyncio.sleep(0)  # the move it started runs (here: records its target)
        client.placement._rebalancing = False
        return chosen[0] if chosen else None

    answers = []
    for kind, state, events, request, _ in log:
        client.requests.clear()
        for replica, (held, free, total, step_s) in zip(client.replicas, state):
            replica.state, replica.step_s, replica.request_ids = "ready", step_s, set()
            replica.client = SimpleNamespace(stats=SimpleNamespace(kv_blocks_free=free, kv_blocks_total=total,
                                                                    lora_adapters=[]))
            for request_id, started, prompt, delivered, output_len, migrating in held:
                core = EngineCoreRequest(request_id, [0] * prompt, SamplingParams(max_tokens=output_len))
                client.requests[request_id] = RoutedRequest(core, replica.replica_id, [1] * delivered, started,
                                                            migrating)
                replica.request_ids.add(request_id)
        for what, rid, hashes in events:  # as _on_replica_update hands them on
            router = client.ledger.router
            (router.on_blocks_stored if what == "stored" else router.on_blocks_evicted)(rid, hashes)
        answers.append(asyncio.run(decide(kind, request)))
    return answers


@pytest.mark.parametrize("workload, cluster", [
    ("shared-prefix", dict(replicas=4, router="cache_aware")),
    ("chat", dict(replicas=3, router="least_loaded", migration=True)),
    ("chat", dict(replicas=3, prefill_replicas=1, decode_replicas=2, router="cache_aware"))])
def test_routing_and_placement_match_the_cluster_client(workload, cluster, monkeypatch):
    """Same requests, same replica states: the simulator's router, P/D target and rebalancing
    moves are the cluster client's, decision by decision."""
    from punctual.config import ClusterConfig, SchedulerConfig

    block_size = 4
    profile = StepProfile("linear", dict(COEFFICIENTS), model={"kv_bytes_per_token": 1000},
                          kv_transfer={"fixed_s": 0.004, "bytes_per_s": 1e8})
    config = ClusterConfig(**cluster)
    sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32), 60, block_size,
                              max_model_len=4096, cluster=config), profile)
    log = _record_decisions(sim)
    requests = to_sim_requests(generate_workload(workload, 24, 3, 0.1, text="synthetic"))
    outcomes, _ = sim.run(requests, offsets=arrival_offsets(len(requests), 30.0, seed=3))
    assert all(o.error is None for o in outcomes)
    kinds = {kind for kind, *_ in log}
    assert "route" in kinds and ("decode" in kinds) == bool(config.prefill_replicas)
    if config.migration:
        assert any(kind == "rebalance" and choice is not None for kind, *_, choice in log)
        assert sim.moves.get("rebalance", 0) > 0  # and the moves landed, their copies priced
    decided = "decode" if config.prefill_replicas else "route"
    assert len({choice for kind, *_, choice in log if kind == decided}) > 1
    assert _replay(log, config, profile, block_size, monkeypatch) == [choice for *_, choice in log]
