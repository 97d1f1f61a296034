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

from bisect import bisect_right
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
    # LoRA adapters (adapter_id) it holds in its step slots or its loaded set: a request for one of
    # them there needs no swap or read from disk.
    adapters: frozenset[str] = frozenset()


class NoReplicaAvailable(RuntimeError):
    """No healthy replica to route to."""


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None = None,
                        algo: str = "sha256", adapter_id: str | None = None) -> list[BlockHash]:
    """The hash chain of the prompt's full blocks, exactly as KVCacheManager.block_hashes makes it
    (same salt, same LoRA adapter, same algorithm), so the router matches what replicas report."""
    return extend_block_hashes([], token_ids, block_size, len(token_ids) // block_size, cache_salt or None,
                               adapter_id=adapter_id, algo=algo)


class Router:
    """Base: the load measure, optimistic load between reports, and rotation among equals.

    The router keeps each replica's load (one float, as `load` computes it) in a list in replica
    id order and refreshes an entry only when that replica's report changes or a request is routed
    there, so a decision costs a few C-level passes over floats rather than a Python pass over
    every replica's report: the simulator routes a million requests over a thousand replicas.
    The cluster client hands every replica's report to each `route`; the simulator hands only the
    replicas whose state moved since its last call (`route(..., changed_only=True)`): a report
    equal to the last one is no news either way, so both make the same decisions."""

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
        # The healthy replicas in id order, and their loads (load()) in the same order.
        self._healthy_ids: list[int] = []
        self._healthy_loads: list[float] = []
        self._position: dict[int, int] = {}  # replica id -> its index in the two lists
        # Adapters routed to a replica since its reported adapter set last changed: it will hold
        # them once those requests arrive (a burst for one adapter must find where the first went).
        self._adapters_routed: dict[int, set[str]] = {}

    # ---- what subclasses decide with --------------------------------------------------------
    def load(self, replica: ReplicaLoad) -> float:
        """One number per replica, in requests: running + waiting + queued prefill + KV pressure."""
        requests, tokens = self._optimistic.get(replica.replica_id, (0, 0))
        used = 1 - replica.kv_blocks_free / replica.kv_blocks_total if replica.kv_blocks_total else 0.0
        return (replica.num_running + replica.num_waiting + requests
                + (replica.queued_prefill_tokens + tokens) / self.prefill_tokens_per_request
                + self.kv_weight * used)

    def observe(self, replicas: list[ReplicaLoad]) -> None:
        """Take these reports; forget optimistic load where a report differs from the last one."""
        reindex = False
        for replica in replicas:
            replica_id = replica.replica_id
            last = self._last_load.get(replica_id)
            if last != replica:
                self._last_load[replica_id] = replica
                self._optimistic.pop(replica_id, None)
                if last is not None and last.adapters != replica.adapters:
                    self._adapters_routed.pop(replica_id, None)
                if last is None or last.healthy != replica.healthy:
                    reindex = True
                elif replica.healthy:
                    self._healthy_loads[self._position[replica_id]] = self.load(replica)
        if reindex:
            self._reindex()

    def _reindex(self) -> None:
        self._healthy_ids = sorted(rid for rid, r in self._last_load.items() if r.healthy)
        self._position = {rid: i for i, rid in enumerate(self._healthy_ids)}
        self._healthy_loads = [self.load(self._last_load[rid]) for rid in self._healthy_ids]

    def _refresh(self, replica_id: int) -> None:
        """Its optimistic load changed: recompute its entry."""
        position = self._position.get(replica_id)
        if position is not None:
            self._healthy_loads[position] = self.load(self._last_load[replica_id])

    def _healthy(self, replicas: list[ReplicaLoad], changed_only: bool = False) -> None:
        """Take the reports (every replica's, or with `changed_only` those that may have changed);
        raises NoReplicaAvailable when no replica is healthy."""
        if not changed_only and len(replicas) != len(self._last_load):
            # The caller's replicas are the whole cluster: any other the router knew is gone.
            given = {r.replica_id for r in replicas}
            for replica_id in [rid for rid in self._last_load if rid not in given]:
                del self._last_load[replica_id]
                self._optimistic.pop(replica_id, None)
                self._adapters_routed.pop(replica_id, None)
            self._reindex()
        self.observe(replicas)
        if not self._healthy_ids:
            raise NoReplicaAvailable("no healthy replica")

    def _rotation(self, replica_id: int) -> int:
        """Tie-break: the replica after the last one chosen comes first (ties spread, not pile)."""
        last = -1 if self._last_choice is None else self._last_choice
        return (replica_id - last - 1) % (1 << 30)

    def _after_last(self) -> int:
        """Index in _healthy_ids of the first replica the rotation puts first (after the last chosen)."""
        last = -1 if self._last_choice is None else self._last_choice
        return bisect_right(self._healthy_ids, last)

    def _least_loaded_id(self) -> tuple[int, float]:
        """(replica, its load): the least loaded healthy replica, ties broken by rotation; the
        same as min over (load, rotation), found by C-level scans of the load list."""
        loads = self._healthy_loads
        least = min(loads)
        start = self._after_last()
        try:
            position = loads.index(least, start)
        except ValueError:
            position = loads.index(least)
        return self._healthy_ids[position], least

    def holds_adapter(self, replica_id: int, adapter_id: str) -> bool:
        """The replica reported the adapter, or requests for it were routed there since its last report."""
        report = self._last_load.get(replica_id)
        return (report is not None and adapter_id in report.adapters
                or adapter_id in self._adapters_routed.get(replica_id, ()))

    def _record_adapter(self, replica_id: int, adapter_id: str | None) -> None:
        if adapter_id is not None:
            self._adapters_routed.setdefault(replica_id, set()).add(adapter_id)

    def _chose(self, replica_id: int) -> int:
        self._last_choice = replica_id
        return replica_id

    # ---- the interface ------------------------------------------------------------------------
    def route(self, prompt_token_ids: list[int], user: str | None, replicas: list[ReplicaLoad],
              changed_only: bool = False, cache_salt: str | None = None, adapter_id: str | None = None) -> int:
        """The replica id for this request; raises NoReplicaAvailable when none is healthy.
        `replicas`: every replica's load, in id order (or with `changed_only`, those whose load
        may have changed since the last call). May record what it decided (cache-aware: the
        prompt's blocks will live there). The request's `cache_salt` and LoRA `adapter_id` key its
        block hashes as they do in the replica."""
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
        self._refresh(replica_id)

    def remove_replica(self, replica_id: int) -> None:
        """The replica died: forget what it held (a restarted one starts empty)."""
        self._optimistic.pop(replica_id, None)
        self._adapters_routed.pop(replica_id, None)
        if self._last_load.pop(replica_id, None) is not None:
            self._reindex()

    def check_integrity(self) -> None:
        for replica_id, (requests, tokens) in self._optimistic.items():
            assert requests > 0 and tokens >= 0, f"replica {replica_id}: optimistic load {requests}, {tokens}"
        assert self._healthy_loads == [self.load(self._last_load[rid]) for rid in self._healthy_ids], \
            "a stale load in the index"


class RoundRobinRouter(Router):
    """Each healthy replica in turn: the baseline that ignores caches and load."""

    name = "round_robin"

    def route(self, prompt_token_ids, user, replicas, changed_only=False, cache_salt=None, adapter_id=None):
        self._healthy(replicas, changed_only)
        start = self._after_last()
        return self._chose(self._healthy_ids[start if start < len(self._healthy_ids) else 0])


class LeastLoadedRouter(Router):
    """The replica with the least load; ignores caches."""

    name = "least_loaded"

    def route(self, prompt_token_ids, user, replicas, changed_only=False, cache_salt=None, adapter_id=None):
        self._healthy(replicas, changed_only)
        return self._chose(self._least_loaded_id()[0])


class CacheAwareRouter(Router):
    """Prefix blocks held against load, behind a hot-spot guard; misses go to the least loaded."""

    name = "cache_aware"

    def __init__(self, block_size: int, hot_spot_margin: float = 2.0, hot_spot_ratio: float = 0.25,
                 tokens_per_load: float = 256.0, sticky_slack: float = 1.0, max_users: int = 100_000,
                 adapter_slack: float = 2.0, **options):
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
        # LoRA affinity: a replica holding the request's adapter takes it while that one is within
        # this much load of the least loaded (a popular adapter stays on few replicas instead of
        # swapping into every replica's slots); with a prefix match, holding it is worth this many
        # requests of load in the score.
        self.adapter_slack = adapter_slack
        # block hash -> the replicas that hold it (or will: see route). Indexed by block, not by
        # replica, so a decision looks only at the replicas holding the prompt's first block.
        self.holders: dict[BlockHash, set[int]] = {}
        self.sticky: OrderedDict[str, int] = OrderedDict()  # user -> replica, least recently routed first

    def matched_blocks(self, replica_id: int, hashes: list[BlockHash]) -> int:
        """How many leading blocks of the chain the replica holds (a chain: stop at the first miss)."""
        count = 0
        holders = self.holders
        for block_hash in hashes:
            held = holders.get(block_hash)
            if held is None or replica_id not in held:
                break
            count += 1
        return count

    def route(self, prompt_token_ids, user, replicas, changed_only=False, cache_salt=None, adapter_id=None):
        self._healthy(replicas, changed_only)
        loads, position = self._healthy_loads, self._position
        mean = sum(loads) / len(loads)
        limit = mean + max(self.hot_spot_margin, self.hot_spot_ratio * mean)
        hashes = prompt_block_hashes(prompt_token_ids, self.block_size, cache_salt, self.hash_algo, adapter_id)
        # The last prompt token is always computed, so a block ending there is no hit (KVCacheManager).
        lookup = hashes[:(len(prompt_token_ids) - 1) // self.block_size]
        # Eligible replicas (load within the guard) that hold at least the first block; every other
        # eligible replica matches 0 blocks.
        matched: dict[int, int] = {}
        first = self.holders.get(lookup[0]) if lookup else None
        if first:
            for replica_id in first:
                index = position.get(replica_id)
                if index is not None and loads[index] <= limit:
                    matched[replica_id] = self.matched_blocks(replica_id, lookup)
        best_match = max(matched.values(), default=0)
        least_id, least = self._least_loaded_id()
        if least > limit:  # float rounding left the least loaded above the guard: decide the long way
            return self._route_over(prompt_token_ids, user, hashes, lookup, limit, adapter_id)
        home = self.sticky.get(user) if user is not None else None
        home_index = position.get(home) if home is not None else None
        if (home_index is not None and loads[home_index] <= limit and matched.get(home, 0) == best_match
                and loads[home_index] <= least + self.sticky_slack):
            choice = home  # the conversation's replica: nobody holds more of it, and it is not busy
        elif best_match == 0:
            choice = least_id  # a miss costs a full prefill: put it where the queue is short
            if adapter_id is not None and not self.holds_adapter(least_id, adapter_id):
                holder = self._adapter_holder(adapter_id, least + self.adapter_slack)
                if holder is not None:
                    choice = holder  # no swap or disk read there, and its load is within the slack
        else:
            # The best of those that match nothing is the least loaded of them (ties: rotation).
            candidates = list(matched)
            if least_id not in matched:
                candidates.append(least_id)
            elif len(matched) < len(loads):
                rest = [(loads[i], self._rotation(rid)) + (rid,) for i, rid in enumerate(self._healthy_ids)
                        if rid not in matched and loads[i] <= limit]
                if rest:
                    candidates.append(min(rest)[2])
            if adapter_id is not None:
                holder = self._adapter_holder(adapter_id, limit)
                if holder is not None and holder not in candidates:
                    candidates.append(holder)
            choice = self._best_score(candidates, matched, adapter_id)
        self._record(choice, hashes, user, adapter_id)
        return self._chose(choice)

    def _adapter_holder(self, adapter_id: str, max_load: float) -> int | None:
        """The least loaded healthy replica holding the adapter with load <= max_load (ties: rotation)."""
        loads = self._healthy_loads
        holders = [(loads[i], self._rotation(rid), rid) for i, rid in enumerate(self._healthy_ids)
                   if loads[i] <= max_load and self.holds_adapter(rid, adapter_id)]
        return min(holders)[2] if holders else None

    def _best_score(self, candidates: list[int], matched: dict[int, int], adapter_id: str | None = None) -> int:
        loads, position, block_size, per_load = self._healthy_loads, self._position, self.block_size, \
            self.tokens_per_load
        bonus = self.adapter_slack * per_load
        return max(candidates, key=lambda rid: (
            matched.get(rid, 0) * block_size - loads[position[rid]] * per_load
            + (bonus if adapter_id is not None and self.holds_adapter(rid, adapter_id) else 0.0),
            -loads[position[rid]], -self._rotation(rid)))

    def _route_over(self, prompt_token_ids, user, hashes, lookup, limit, adapter_id=None) -> int:
        """The decision over every eligible replica, in Python (only where rounding needs it)."""
        loads = {rid: self._healthy_loads[i] for i, rid in enumerate(self._healthy_ids)}
        eligible = [rid for rid in self._healthy_ids if loads[rid] <= limit]
        matched = {rid: self.matched_blocks(rid, lookup) for rid in eligible}
        best_match = max(matched.values())
        least = min(loads[rid] for rid in eligible)
        home = self.sticky.get(user) if user is not None else None
        if home in matched and matched[home] == best_match and loads[home] <= least + self.sticky_slack:
            choice = home
        elif best_match == 0:
            choice = min(eligible, key=lambda rid: (loads[rid], self._rotation(rid)))
            if adapter_id is not None and not self.holds_adapter(choice, adapter_id):
                holders = [rid for rid in eligible if loads[rid] <= least + self.adapter_slack
                           and self.holds_adapter(rid, adapter_id)]
                if holders:
                    choice = min(holders, key=lambda rid: (loads[rid], self._rotation(rid)))
        else:
            choice = self._best_score(eligible, matched, adapter_id)
        self._record(choice, hashes, user, adapter_id)
        return self._chose(choice)

    def _record(self, choice: int, hashes: list[BlockHash], user: str | None, adapter_id: str | None = None) -> None:
        self._record_adapter(choice, adapter_id)
        # The prompt's blocks will be cached there once its prefill runs: requests that share it
        # and arrive before the replica reports them should follow (SGLang's approximate tree).
        self.on_blocks_stored(choice, hashes)
        if user is not None:
            self.sticky[user] = choice
            self.sticky.move_to_end(user)
            if len(self.sticky) > self.max_users:
                self.sticky.popitem(last=False)

    def on_blocks_stored(self, replica_id, block_hashes):
        holders = self.holders
        for block_hash in block_hashes:
            held = holders.get(block_hash)
            if held is None:
                holders[block_hash] = {replica_id}
            else:
                held.add(replica_id)

    def on_blocks_evicted(self, replica_id, block_hashes):
        holders = self.holders
        for block_hash in block_hashes:
            held = holders.get(block_hash)
            if held is not None:
                held.discard(replica_id)
                if not held:
                    del holders[block_hash]

    def remove_replica(self, replica_id):
        super().remove_replica(replica_id)
        for block_hash in [h for h, held in self.holders.items() if replica_id in held]:
            self.on_blocks_evicted(replica_id, [block_hash])
        for user in [u for u, r in self.sticky.items() if r == replica_id]:
            del self.sticky[user]

    def check_integrity(self):
        super().check_integrity()
        assert len(self.sticky) <= self.max_users, "sticky table over its bound"
        assert all(isinstance(r, int) for r in self.sticky.values()), "sticky entry without a replica"
        assert all(self.holders.values()), "a block held by nobody still indexed"


ROUTERS = {cls.name: cls for cls in (CacheAwareRouter, LeastLoadedRouter, RoundRobinRouter)}


def make_router(name: str, block_size: int, **options) -> Router:
    """The router called `name` (cache_aware | least_loaded | round_robin); options go to its constructor."""
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {name!r}")
    return ROUTERS[name](block_size, **options)
