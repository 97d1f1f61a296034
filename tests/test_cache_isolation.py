"""Prefix-cache isolation (cache_salt) and collision-proof block hashes, in one process:
the hash chain, the engine's reuse, pins, the CPU tier, the router's chain and KV moves."""
from __future__ import annotations

import subprocess
import sys

import pytest

from punctual import LLM, SamplingParams
from punctual.cluster.router import ReplicaLoad, make_router, prompt_block_hashes
from punctual.config import EngineConfig
from punctual.engine.core import EngineCore
from punctual.kv.block_pool import hash_block
from punctual.kv.manager import KVCacheManager
from punctual.request import EngineCoreRequest, Request
from punctual.sched.policies import FairPolicy

BS = 16  # builtin-tiny's default block size
GREEDY = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
PROMPT = list(range(100, 100 + 3 * BS + 5))  # 3 full blocks a repeat can hit
# Two different first blocks whose builtin (Python tuple) hashes collide: the first 8 tokens are
# the bytes of two 64-bit states that tests/builtin_hash_collision.c found colliding after 8 tuple
# elements (about 7e9 steps of a distinguished-point search); any common suffix keeps the collision.
COLLIDING = ([239, 50, 69, 192, 186, 66, 235, 90] + [5] * 8, [63, 75, 161, 37, 33, 130, 206, 226] + [5] * 8)


def request(tokens, salt=None, rid="r") -> Request:
    return Request(EngineCoreRequest(rid, list(tokens), SamplingParams(max_tokens=1), cache_salt=salt), 4096)


def cached_tokens(llm: LLM, prompt: list[int], salt: str | None = None) -> int:
    item = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
    (out,) = llm.generate(item, GREEDY, use_tqdm=False)
    return out.num_cached_tokens


def idle_engine(llm: LLM) -> None:
    core = llm.engine.core
    core.check_integrity()
    assert core.kv_manager.num_used_blocks == 0 and not core.kv_manager.pending


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("builtin-tiny", num_kv_blocks=64)


# ---- the hash chain -----------------------------------------------------------------------
def test_the_salt_keys_every_block_of_the_chain():
    plain = prompt_block_hashes(PROMPT, BS)
    salted = prompt_block_hashes(PROMPT, BS, cache_salt="alice")
    assert len(plain) == len(salted) == 3 and all(isinstance(h, bytes) and len(h) == 32 for h in salted)
    assert not set(plain) & set(salted)  # the first block's salt reaches every block through its parent
    assert salted == prompt_block_hashes(PROMPT, BS, cache_salt="alice")
    assert prompt_block_hashes(PROMPT, BS, cache_salt="") == plain  # empty salt: today's sharing
    assert hash_block(None, PROMPT[:BS], adapter_id="lora-1") != plain[0]  # the adapter slot counts too
    for algo in ("sha256", "builtin"):
        kv = KVCacheManager(16, BS, hash_algo=algo)
        assert prompt_block_hashes(PROMPT, BS, "bob", algo) == kv.block_hashes(request(PROMPT, "bob"), len(PROMPT))[:3]
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        KVCacheManager(16, BS, hash_algo="md5")


def test_salted_hashes_agree_across_processes():
    """The router (front end) and each replica hash in their own process: no hash randomisation."""
    for algo in ("sha256", "builtin"):
        here = prompt_block_hashes(PROMPT, BS, "alice", algo)
        code = ("from punctual.cluster.router import prompt_block_hashes; "
                f"print(prompt_block_hashes({PROMPT!r}, {BS}, 'alice', {algo!r}))")
        there = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                               env={"PYTHONHASHSEED": "12345"}).stdout
        assert there.strip() == str(here)


# ---- the engine ---------------------------------------------------------------------------
def test_only_the_same_salt_shares_cached_blocks(llm):
    prompt = [7] + PROMPT
    assert cached_tokens(llm, prompt, "alice") == 0
    assert cached_tokens(llm, prompt, "bob") == 0  # a different salt: a miss, though the tokens are cached
    assert cached_tokens(llm, prompt) == 0  # no salt does not reach salted blocks either
    assert cached_tokens(llm, prompt, "alice") == 3 * BS
    assert cached_tokens(llm, prompt, "bob") == 3 * BS
    assert cached_tokens(llm, prompt) == 3 * BS  # no salt shares with no salt, as before
    idle_engine(llm)


def test_a_pin_serves_its_own_salt_only(llm):
    core = llm.engine.core
    document = [8] + PROMPT
    assert core.pin_prefix("doc", document, cache_salt="alice").ok
    while core.has_unfinished_requests():
        core.step()
    assert core.pinned_tokens("doc") == 3 * BS
    assert cached_tokens(llm, document + [1], "bob") == 0
    assert cached_tokens(llm, document + [1], "alice") == 3 * BS
    assert core.unpin_prefix("doc").ok
    idle_engine(llm)


def test_offline_salt_keyword_and_prompt_dict_must_agree(llm):
    with pytest.raises(ValueError, match="cache_salt"):
        llm.engine.add_request("x", {"prompt_token_ids": PROMPT, "cache_salt": "a"}, GREEDY, cache_salt="b")
    with pytest.raises(TypeError, match="cache_salt"):
        llm.engine.add_request("x", {"prompt_token_ids": PROMPT, "cache_salt": 5}, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_a_crafted_builtin_collision_shares_kv_and_sha256_does_not():
    first, second = COLLIDING
    assert first != second and hash(tuple(first)) == hash(tuple(second))
    assert hash_block(None, first, algo="builtin") == hash_block(None, second, algo="builtin")
    assert hash_block(None, first) != hash_block(None, second)
    tail = [9, 9, 9]
    for algo, expected in (("builtin", BS), ("sha256", 0)):
        llm = LLM("builtin-tiny", num_kv_blocks=16, prefix_caching_hash_algo=algo)
        assert cached_tokens(llm, first + tail) == 0
        # builtin: the second prompt is served the first one's KV for tokens it does not contain.
        assert cached_tokens(llm, second + tail) == expected, algo
        idle_engine(llm)


def test_hash_algo_is_validated():
    with pytest.raises(ValueError, match="prefix_caching_hash_algo must be sha256|builtin"):
        EngineConfig.from_kwargs("builtin-tiny", prefix_caching_hash_algo="md5")


# ---- the CPU tier, the router, KV moves, fairness -----------------------------------------
def test_the_tier_returns_blocks_to_the_same_salt_only():
    kv = KVCacheManager(num_blocks=4, block_size=2, num_tier_slots=8)
    tokens = [1, 2, 3, 4, 5]
    owner = request(tokens, "alice", "a")
    assert kv.allocate(owner, owner.num_tokens, kv.computed_prefix(owner))
    owner.num_computed_tokens = owner.num_tokens
    kv.cache_full_blocks(owner)
    kv.free(owner)
    filler = request([9, 9, 9, 9, 9, 9, 9], None, "f")  # evicts alice's blocks into the tier
    assert kv.allocate(filler, filler.num_tokens, kv.computed_prefix(filler))
    kv.free(filler)
    assert len(kv.tier) >= 2
    assert len(kv.computed_prefix(request(tokens, "bob", "b"))) == 0
    assert kv.computed_prefix(request(tokens, "alice", "c")).tier_hashes  # back from the tier
    kv.check_integrity()


def test_the_router_matches_only_the_same_salt():
    router = make_router("cache_aware", BS, tokens_per_load=16)
    loads = [ReplicaLoad(0, True, 0, 0, 0, 100, 100), ReplicaLoad(1, True, 1, 0, 0, 100, 100)]
    router.on_blocks_stored(1, prompt_block_hashes(PROMPT, BS, "alice"))  # replica 1 holds alice's copy
    assert router.route(PROMPT, None, loads, cache_salt="alice") == 1
    assert router.route(PROMPT, None, loads, cache_salt="bob") == 0  # nobody holds bob's: least loaded
    router.check_integrity()


def test_a_moved_request_keeps_its_salt():
    def engine() -> EngineCore:
        return EngineCore(EngineConfig.from_kwargs("builtin-tiny", num_kv_blocks=32, block_size=4))

    source, target = engine(), engine()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    source.add_request(EngineCoreRequest("m", PROMPT[:13], params, cache_salt="alice", tenant="acme"))
    while source.scheduler.requests["m"].num_output_tokens == 0:
        source.step()
    state, payload = source.migrate_out("m")
    assert (state.core_request.cache_salt, state.core_request.tenant) == ("alice", "acme")
    assert target.reserve_import("m", 0) and target.commit_import(state, 0, payload)
    while target.has_unfinished_requests():
        target.step()
    # The moved KV was indexed under alice's chain on the target: hers to reuse, nobody else's.
    assert len(target.kv_manager.computed_prefix(request(PROMPT[:13], "alice", "q1"))) == 3
    assert len(target.kv_manager.computed_prefix(request(PROMPT[:13], "bob", "q2"))) == 0
    source.check_integrity()
    target.check_integrity()


def test_the_fair_policy_counts_by_tenant_before_user():
    def of(user, tenant):
        return FairPolicy.user_of(Request(EngineCoreRequest("t", [1], SamplingParams(), user=user, tenant=tenant), 64))

    assert of("u1", "acme") == of("u2", "acme") == "acme"
    assert of("u1", None) == "u1"


# ---- who is calling (server/auth.py) -------------------------------------------------------
def test_api_keys_and_their_tenants(tmp_path):
    from punctual.server.auth import load_api_keys, tenant_of

    key_file = tmp_path / "keys"
    key_file.write_text("# rotation: two keys of acme\nk1 acme\nk2 acme\n\nk3 globex\n")
    keys = load_api_keys(["solo", "other"], str(key_file))
    assert keys == {"solo": "key-1", "other": "key-2", "k1": "acme", "k2": "acme", "k3": "globex"}
    assert tenant_of(keys, "Bearer k2") == "acme" and tenant_of(keys, "bearer  solo ") == "key-1"
    assert tenant_of(keys, "Bearer nope") is None and tenant_of(keys, "k1") is None
    for text, why in (("k1\n", "line 1: expected `KEY TENANT`"), ("k1 a b\n", "line 1"),
                      ("k1 acme\nk1 globex\n", "line 2: the key is already given for tenant 'acme'"),
                      ("k1 a/b\n", "tenant 'a/b' must be")):
        key_file.write_text(text)
        with pytest.raises(ValueError, match=why):
            load_api_keys([], str(key_file))
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys([], str(tmp_path / "missing"))


def test_isolation_overrides_the_client_salt():
    from punctual.server.auth import isolation_salt
    from punctual.server.config import ServerConfig

    assert isolation_salt("none", "acme", "u1", "s") == "s" and isolation_salt("none", None, None, None) is None
    assert isolation_salt("api-key", "acme", "u1", "s") == isolation_salt("api-key", "acme", "u2", None)
    assert isolation_salt("api-key", "acme", None, "s") != isolation_salt("api-key", "globex", None, "s")
    assert isolation_salt("user", "acme", "u1", "s") != isolation_salt("user", "acme", "u2", "s")
    with pytest.raises(ValueError, match="api-key needs API keys"):
        ServerConfig("m", prefix_cache_isolation="api-key")
    with pytest.raises(ValueError, match="prefix_cache_isolation must be one of"):
        ServerConfig("m", prefix_cache_isolation="tenant")
    assert ServerConfig("m", api_key="k").api_keys == {"k": "key-1"}  # the single-key form still works
