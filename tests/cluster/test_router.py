"""The routing policy on hand-built loads: no Ray, no torch, no model."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from punctual.cluster.state import RoutedRequest, resumed_request
from punctual.cluster.router import NoReplicaAvailable, ReplicaLoad, make_router, prompt_block_hashes
from punctual.kv.manager import KVCacheManager
from punctual.request import EngineCoreRequest, Request
from punctual.sampling_params import SamplingParams

BS = 4  # tokens per block


def idle(count: int = 2, **overrides) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, True, 0, 0, 0, 100, 100) for i in range(count)] if not overrides else \
        [replace(ReplicaLoad(i, True, 0, 0, 0, 100, 100), **overrides) for i in range(count)]


def doc(seed: int, blocks: int = 8) -> list[int]:
    return [seed * 1000 + i for i in range(blocks * BS)]


def test_router_imports_no_torch_ray_or_clock():
    code = ("import sys, punctual.cluster.router; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'torch or ray imported'; "
            "src = open(punctual.cluster.router.__file__).read(); "
            "assert 'import time' not in src and 'monotonic' not in src, 'a clock in the policy'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hash_chain_matches_the_kv_manager():
    """The router matches prompts against the hashes replicas report: the two chains must agree,
    across processes too (hash(None) differs per process before Python 3.12)."""
    tokens = doc(1, 5) + [7, 7]
    kv = KVCacheManager(64, BS)
    request = Request(EngineCoreRequest("r", tokens, SamplingParams(max_tokens=1)), 4096)
    assert prompt_block_hashes(tokens, BS) == kv.block_hashes(request, len(tokens))[:len(tokens) // BS]
    code = ("from punctual.cluster.router import prompt_block_hashes; "
            f"print(prompt_block_hashes({tokens!r}, {BS}))")
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert other.strip() == str(prompt_block_hashes(tokens, BS))


def test_cache_hit_preferred_and_learned_from_events():
    # One request more in the queue weighs as 16 prompt tokens: the 32 cached ones outweigh it.
    router = make_router("cache_aware", BS, tokens_per_load=16)
    prompt = doc(1) + [1, 2]
    router.on_blocks_stored(1, prompt_block_hashes(prompt, BS))
    loads = idle(2)
    loads[1] = replace(loads[1], num_running=1)  # a little busier, but it holds the document
    assert router.route(prompt, None, loads) == 1
    router.on_blocks_evicted(1, prompt_block_hashes(prompt, BS))
    assert router.matched_blocks(1, prompt_block_hashes(prompt, BS)) == 0
    assert router.route(prompt, None, loads) == 0  # gone from its cache: the least loaded
    router.check_integrity()


def test_shared_prefix_follows_the_first_request_before_any_event():
    router = make_router("cache_aware", BS)
    first = router.route(doc(3) + [1], None, idle(2))
    assert router.route(doc(3) + [2, 2], None, idle(2)) == first


def test_hot_spot_guard_beats_the_cache():
    router = make_router("cache_aware", BS, hot_spot_margin=2.0, hot_spot_ratio=0.0)
    prompt = doc(1)
    router.on_blocks_stored(0, prompt_block_hashes(prompt, BS))
    loads = idle(3)
    loads[0] = replace(loads[0], num_running=4, num_waiting=2)  # mean 2, limit 4: replica 0 is hot
    assert router.route(prompt, None, loads) != 0


def test_misses_go_to_the_least_loaded_not_the_cache_holder():
    """No death spiral: a miss never piles on the loaded replica that holds other documents."""
    router = make_router("cache_aware", BS)
    router.on_blocks_stored(0, prompt_block_hashes(doc(1), BS))
    loads = idle(2)
    loads[0] = replace(loads[0], num_running=2)
    for seed in range(10, 20):
        assert router.route(doc(seed), None, loads) == 1
        router.remove_replica(1)  # forget the prediction, so every miss stays a miss


def test_misses_spread_over_idle_replicas():
    router = make_router("cache_aware", BS)
    chosen = set()
    for seed in range(4):
        replica = router.route(doc(seed), None, idle(2))
        router.on_request_routed(replica, 8 * BS)  # the load reports are stale: count it
        chosen.add(replica)
    assert chosen == {0, 1}


def test_user_sticks_while_balanced_and_moves_when_not():
    router = make_router("cache_aware", BS)
    home = router.route([1, 2, 3], "alice", idle(2))
    assert router.route([9, 8, 7], "alice", idle(2)) == home
    loads = idle(2)
    loads[home] = replace(loads[home], num_running=3)
    assert router.route([5, 5, 5], "alice", loads) != home


def test_round_robin_and_least_loaded():
    rr = make_router("round_robin", BS)
    assert [rr.route([1], None, idle(3)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    loads = idle(3)
    loads[1] = replace(loads[1], healthy=False)
    assert {rr.route([1], None, loads) for _ in range(4)} == {0, 2}
    ll = make_router("least_loaded", BS)
    loads = idle(3)
    loads[0] = replace(loads[0], num_waiting=2)
    loads[2] = replace(loads[2], queued_prefill_tokens=4096)
    assert ll.route([1], None, loads) == 1


def test_no_healthy_replica_raises():
    for name in ("cache_aware", "least_loaded", "round_robin"):
        with pytest.raises(NoReplicaAvailable):
            make_router(name, BS).route([1], None, idle(2, healthy=False))
    with pytest.raises(ValueError, match="router"):
        make_router("random", BS)


def test_resumed_request_continues_where_the_stream_stopped():
    params = SamplingParams(max_tokens=10, min_tokens=4, temperature=0)
    routed = RoutedRequest(EngineCoreRequest("r", [1, 2, 3], params, arrival_time=5.0), 0, delivered=[7, 8, 9])
    resumed = resumed_request(routed)
    assert resumed.prompt_token_ids == [1, 2, 3, 7, 8, 9] and resumed.arrival_time == 5.0
    assert resumed.sampling_params.max_tokens == 7 and resumed.sampling_params.min_tokens == 1
    assert routed.request.sampling_params.max_tokens == 10  # the original is untouched


# ---- the indexed router decides as the plain definitions do --------------------------------------
def reference_route(router, prompt, user, loads_by_id: dict[int, float], holders: dict) -> int:
    """The cache-aware / least-loaded / round-robin decision written over every replica, as the
    router was before it kept its loads indexed: the oracle for the indexed one."""
    def rotation(rid):
        last = -1 if router._last_choice is None else router._last_choice
        return (rid - last - 1) % (1 << 30)
    healthy = sorted(loads_by_id)
    if router.name == "round_robin":
        return min(healthy, key=rotation)
    if router.name == "least_loaded":
        return min(healthy, key=lambda r: (loads_by_id[r], rotation(r)))
    mean = sum(loads_by_id[r] for r in healthy) / len(healthy)
    limit = mean + max(router.hot_spot_margin, router.hot_spot_ratio * mean)
    eligible = [r for r in healthy if loads_by_id[r] <= limit]
    hashes = prompt_block_hashes(prompt, BS)
    lookup = hashes[:(len(prompt) - 1) // BS]

    def matched_blocks(rid):
        count = 0
        for h in lookup:
            if rid not in holders.get(h, ()):
                break
            count += 1
        return count
    matched = {r: matched_blocks(r) for r in eligible}
    best = max(matched.values())
    least = min(loads_by_id[r] for r in eligible)
    home = router.sticky.get(user) if user is not None else None
    if home in matched and matched[home] == best and loads_by_id[home] <= least + router.sticky_slack:
        return home
    if best == 0:
        return min(eligible, key=lambda r: (loads_by_id[r], rotation(r)))
    return max(eligible, key=lambda r: (matched[r] * BS - loads_by_id[r] * router.tokens_per_load,
                                        -loads_by_id[r], -rotation(r)))


@pytest.mark.parametrize("name", ["cache_aware", "least_loaded", "round_robin"])
@pytest.mark.parametrize("changed_only", [False, True])
def test_indexed_router_decides_as_the_plain_definitions(name, changed_only):
    """Random reports (ties, hot spots, full pools), shared prefixes, sticky users, evictions,
    replicas turning unhealthy: every choice equals the plain one over every replica, whether the
    caller hands every report (the cluster client) or only the changed ones (the simulator)."""
    import random

    rng = random.Random(7)
    router = make_router(name, BS)
    replicas = 12
    loads = [ReplicaLoad(i, True, 0, 0, 0, 64, 64) for i in range(replicas)]
    docs = [doc(d, 3) for d in range(6)]
    changed = set(range(replicas))
    for step in range(600):
        for _ in range(rng.randrange(3)):  # reports move, often back to an earlier value
            i = rng.randrange(replicas)
            loads[i] = ReplicaLoad(i, rng.random() > 0.05, rng.randrange(4), rng.randrange(3),
                                   rng.choice([0, 0, 16, 600]), rng.choice([64, 64, 10, 0]), 64)
            changed.add(i)
        if name == "cache_aware" and rng.random() < 0.1:
            victim = rng.randrange(replicas)
            router.on_blocks_evicted(victim, prompt_block_hashes(rng.choice(docs), BS))
        if not any(r.healthy for r in loads):
            continue
        prompt = rng.choice(docs) + [rng.randrange(50) for _ in range(rng.randrange(1, 6))]
        user = rng.choice([None, "a", "b", "c"])
        # The oracle sees what the router will: reports that changed drop their optimistic load.
        for r in loads:
            if router._last_load.get(r.replica_id) != r:
                router._optimistic.pop(r.replica_id, None)
        given = [loads[i] for i in changed] if changed_only else loads
        held = {h: set(s) for h, s in getattr(router, "holders", {}).items()}
        snapshot = {r.replica_id: router.load(r) for r in loads if r.healthy}
        expected = reference_route(router, prompt, user, snapshot, held)
        assert router.route(prompt, user, given, changed_only=changed_only) == expected, step
        changed.clear()
        router.on_request_routed(expected, len(prompt))
        router.check_integrity()


def test_adapter_affinity_within_load_and_spill_over():
    """Requests for adapter A go to the replica holding A while loads are close; when that one is
    overloaded they spill to the other (which then holds A too)."""
    router = make_router("cache_aware", BS)
    holds_a = frozenset({"lora:1"})
    loads = idle(2)
    loads[1] = replace(loads[1], adapters=holds_a, num_running=1)  # a little busier, but it holds A
    for seed in range(3):  # no shared prefix: affinity alone decides
        assert router.route(doc(seed), None, loads, adapter_id="lora:1") == 1
    assert router.route(doc(9), None, loads) == 0  # the base model: the least loaded
    assert router.route(doc(10), None, loads, adapter_id="lora:2") == 0  # nobody holds it
    busy = [loads[0], replace(loads[1], num_running=6)]
    assert router.route(doc(11), None, busy, adapter_id="lora:1") == 0  # overloaded: spill over
    assert router.holds_adapter(0, "lora:1")  # routed there: a burst follows it until the next report
    router.check_integrity()


def test_adapter_burst_spreads_once_the_holder_is_loaded():
    """Without reports in between, a burst for one adapter stays where the first went only while
    that replica's optimistic load is within the slack of the other's."""
    router = make_router("cache_aware", BS, adapter_slack=2.0)
    chosen = []
    for seed in range(6):
        rid = router.route(doc(seed), None, idle(2), adapter_id="lora:7")
        router.on_request_routed(rid, len(doc(seed)))
        chosen.append(rid)
    assert chosen[1] == chosen[0]  # the holder took the second too (least loaded alone would alternate)
    assert set(chosen) == {0, 1}  # then load won: both replicas serve it
    router.check_integrity()
