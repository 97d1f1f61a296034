"""The routing policy: which replica serves a request. Pure Python: no torch, no Ray, no clock,
so the simulator runs it unchanged.

The caller (cluster/client.py, or the simulator) tells the router what it knows of each replica
(ReplicaLoad) on every decision, and feeds it the replicas' prefix-cache block events. The
router only decides; it never sends anything.

Cache-aware routing weighs the prompt blocks a replica already holds against its load (Dynamo's
KV router, SGLang's cache-aware router), with two guards that the known failures call for:
- a hot-spot guard: a replica whose load exceeds the mean by a margin gets nothing, whatever its
  cache holds (vllm-project/router#179: a router blind to load sent all traffic to one engine);
- a cache miss goes to the least loaded replica, never to a loaded one (sglang PR 14305: misses
  piling on a loaded worker made it slower, so it missed more: a "death spiral").
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from punctual.kv.block_pool import BlockHash, check_hash_algo, extend_block_hashes


@dataclass
class ReplicaLoad:
    """What the router knows of one replica when it decides."""

    replica_id: int
    healthy: bool
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int  # prompt tokens routed there and not yet computed
    kv_blocks_free: int
    kv_blocks_total: int


class NoReplicaAvailable(RuntimeError):
    """No healthy replica to route to."""


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None = None,
                        algo: str = "sha256") -> list[BlockHash]:
    """The hash chain of the prompt's full blocks, exactly as KVCacheManager.block_hashes makes it
    (same salt, same algorithm), so the router matches what replicas report."""
    return extend_block_hashes([], token_ids, block_size, len(token_ids) // block_size, cache_salt or None,
                               algo=algo)


class Router:
    """Base: the load measure, optimistic load between reports, and rotation among equals."""

    name = "base"

    def __init__(self, block_size: int, prefill_tokens_per_request: int = 512, kv_weight: float = 1.0,
                 hash_algo: str = "sha256"):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.hash_algo = check_hash_algo(hash_algo)  # the replicas' prefix_caching_hash_algo
        # A queued prompt of this many tokens weighs as much as one more request in the queue
        # (about one step's token budget of prefill).
        self.prefill_tokens_per_request = prefill_tokens_per_request
        self.kv_weight = kv_weight  # a full KV pool counts as this many requests more
        # Requests (and their prompt tokens) routed to a replica since its reported load last
        # changed: a burst routed between two reports must not all land on the same replica.
        self._optimistic: dict[int, list[int]] = {}
        self._last_load: dict[int, ReplicaLoad] = {}
        self._last_choice: int | None = None

    # ---- what subclasses decide with --------------------------------------------------------
    def load(self, replica: ReplicaLoad) -> float:
        """One number per replica, in requests: running + waiting + queued prefill + KV pressure."""
        requests, tokens = self._optimistic.get(replica.replica_id, (0, 0))
        used = 1 - replica.kv_blocks_free / replica.kv_blocks_total if replica.kv_blocks_total else 0.0
        return (replica.num_running + replica.num_waiting + requests
                + (replica.queued_prefill_tokens + tokens) / self.prefill_tokens_per_request
                + self.kv_weight * used)

    def _healthy(self, replicas: list[ReplicaLoad]) -> list[ReplicaLoad]:
        """The healthy replicas; forget optimistic load where a fresh report has arrived."""
        for replica in replicas:
            if self._last_load.get(replica.replica_id) != replica:
                self._last_load[replica.replica_id] = replica
                self._optimistic.pop(replica.replica_id, None)
        healthy = [r for r in replicas if r.healthy]
        if not healthy:
            raise NoReplicaAvailable("no healthy replica")
        return healthy

    def _rotation(self, replica_id: int) -> int:
        """Tie-break: the replica after the last one chosen comes first (ties spread, not pile)."""
        last = -1 if self._last_choice is None else self._last_choice
        return (replica_id - last - 1) % (1 << 30)

    def _least_loaded(self, replicas: list[ReplicaLoad]) -> int:
        return min(replicas, key=lambda r: (self.load(r), self._rotation(r.replica_id))).replica_id

    def _chose(self, replica_id: int) -> int:
        self._last_choice = replica_id
        return replica_id

    # ---- the interface ------------------------------------------------------------------------
    def route(self, prompt_token_ids: list[int], user: str | None, replicas: list[ReplicaLoad],
              cache_salt: str | None = None) -> int:
        """The replica id for this request; raises NoReplicaAvailable when none is healthy.
        May record what it decided (cache-aware: the prompt's blocks will live there). The
        request's `cache_salt` keys its block hashes as it does in the replica."""
        raise NotImplementedError

    def on_blocks_stored(self, replica_id: int, block_hashes: list[int]) -> None:
        """The replica's prefix cache indexed these blocks."""

    def on_blocks_evicted(self, replica_id: int, block_hashes: list[int]) -> None:
        """The replica's prefix cache dropped these blocks."""

    def on_request_routed(self, replica_id: int, num_prompt_tokens: int) -> None:
        """Count the request against the replica until its next load report."""
        pending = self._optimistic.setdefault(replica_id, [0, 0])
        pending[0] += 1
        pending[1] += num_prompt_tokens

    def remove_replica(self, replica_id: int) -> None:
        """The replica died: forget what it held (a restarted one starts empty)."""
        self._optimistic.pop(replica_id, None)
        self._last_load.pop(replica_id, None)

    def check_integrity(self) -> None:
        for replica_id, (requests, tokens) in self._optimistic.items():
            assert requests > 0 and tokens >= 0, f"replica {replica_id}: optimistic load {requests}, {tokens}"


class RoundRobinRouter(Router):
    """Each healthy replica in turn: the baseline that ignores caches and load."""

    name = "round_robin"

    def route(self, prompt_token_ids, user, replicas, cache_salt=None):
        healthy = self._healthy(replicas)
        return self._chose(min(healthy, key=lambda r: self._rotation(r.replica_id)).replica_id)


class LeastLoadedRouter(Router):
    """The replica with the least load; ignores caches."""

    name = "least_loaded"

    def route(self, prompt_token_ids, user, replicas, cache_salt=None):
        return self._chose(self._least_loaded(self._healthy(replicas)))


class CacheAwareRouter(Router):
    """Prefix blocks held against load, behind a hot-spot guard; misses go to the least loaded."""

    name = "cache_aware"

    def __init__(self, block_size: int, hot_spot_margin: float = 2.0, hot_spot_ratio: float = 0.25,
                 tokens_per_load: float = 256.0, sticky_slack: float = 1.0, max_users: int = 100_000,
                 **options):
        super().__init__(block_size, **options)
        # Guard: no request for a replica whose load exceeds the mean by max(margin, ratio * mean).
        self.hot_spot_margin = hot_spot_margin
        self.hot_spot_ratio = hot_spot_ratio
        # Exchange rate of the score: one request more in a replica's queue is worth this many
        # prompt tokens found in its cache (prefill it would save).
        self.tokens_per_load = tokens_per_load
        # A user's requests stay on its replica while that one is within this much of the least loaded.
        self.sticky_slack = sticky_slack
        self.max_users = max_users
        self.cached: dict[int, set[BlockHash]] = {}  # replica -> block hashes it holds (or will: see route)
        self.sticky: OrderedDict[str, int] = OrderedDict()  # user -> replica, least recently routed first

    def matched_blocks(self, replica_id: int, hashes: list[BlockHash]) -> int:
        """How many leading blocks of the chain the replica holds (a chain: stop at the first miss)."""
        held = self.cached.get(replica_id)
        if not held:
            return 0
        count = 0
        for block_hash in hashes:
            if block_hash not in held:
                break
            count += 1
        return count

    def route(self, prompt_token_ids, user, replicas, cache_salt=None):
        healthy = self._healthy(replicas)
        loads = {r.replica_id: self.load(r) for r in healthy}
        mean = sum(loads.values()) / len(loads)
        limit = mean + max(self.hot_spot_margin, self.hot_spot_ratio * mean)
        eligible = [r for r in healthy if loads[r.replica_id] <= limit]  # never empty: min <= mean
        hashes = prompt_block_hashes(prompt_token_ids, self.block_size, cache_salt, self.hash_algo)
        # The last prompt token is always computed, so a block ending there is no hit (KVCacheManager).
        lookup = hashes[:(len(prompt_token_ids) - 1) // self.block_size]
        matched = {r.replica_id: self.matched_blocks(r.replica_id, lookup) for r in eligible}
        best_match = max(matched.values())
        least = min(loads[r.replica_id] for r in eligible)
        home = self.sticky.get(user) if user is not None else None
        if home in matched and matched[home] == best_match and loads[home] <= least + self.sticky_slack:
            choice = home  # the conversation's replica: nobody holds more of it, and it is not busy
        elif best_match == 0:
            choice = self._least_loaded(eligible)  # a miss costs a full prefill: put it where the queue is short
        else:
            choice = max(eligible, key=lambda r: (
                matched[r.replica_id] * self.block_size - loads[r.replica_id] * self.tokens_per_load,
                -loads[r.replica_id], -self._rotation(r.replica_id))).replica_id
        # The prompt's blocks will be cached there once its prefill runs: requests that share it
        # and arrive before the replica reports them should follow (SGLang's approximate tree).
        self.cached.setdefault(choice, set()).update(hashes)
        if user is not None:
            self.sticky[user] = choice
            self.sticky.move_to_end(user)
            if len(self.sticky) > self.max_users:
                self.sticky.popitem(last=False)
        return self._chose(choice)

    def on_blocks_stored(self, replica_id, block_hashes):
        self.cached.setdefault(replica_id, set()).update(block_hashes)

    def on_blocks_evicted(self, replica_id, block_hashes):
        held = self.cached.get(replica_id)
        if held:
            held.difference_update(block_hashes)

    def remove_replica(self, replica_id):
        super().remove_replica(replica_id)
        self.cached.pop(replica_id, None)
        for user in [u for u, r in self.sticky.items() if r == replica_id]:
            del self.sticky[user]

    def check_integrity(self):
        super().check_integrity()
        assert len(self.sticky) <= self.max_users, "sticky table over its bound"
        assert all(isinstance(r, int) for r in self.sticky.values()), "sticky entry without a replica"


ROUTERS = {cls.name: cls for cls in (CacheAwareRouter, LeastLoadedRouter, RoundRobinRouter)}


def make_router(name: str, block_size: int, **options) -> Router:
    """The router called `name` (cache_aware | least_loaded | round_robin); options go to its constructor."""
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {name!r}")
    return ROUTERS[name](block_size, **options)
