"""Which replica gets an arriving request: round_robin and least_loaded built in, and the
cluster's own router (`punctual.cluster.router`, pure Python) when it is importable, so the
simulator runs the shipped routing policy as it runs the shipped scheduler.

A router here is a callable (prompt_token_ids, user, replicas) -> replica index.
"""
from __future__ import annotations

from typing import Callable, Sequence

from punctual.sim.replica import SimReplica

Router = Callable[[Sequence[int], "str | None", Sequence[SimReplica]], int]
BUILTIN_ROUTERS = ("round_robin", "least_loaded")


class RoundRobin:
    def __init__(self) -> None:
        self.next = 0

    def __call__(self, prompt_token_ids, user, replicas) -> int:
        index = self.next % len(replicas)
        self.next += 1
        return index


def least_loaded(prompt_token_ids, user, replicas) -> int:
    """Fewest requests in the replica (running + waiting), then most free KV blocks, then lowest id."""
    best, best_key = 0, None
    for i, replica in enumerate(replicas):
        sched = replica.scheduler
        key = (len(sched.requests), -replica.kv.num_free_blocks)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


class ClusterRouterAdapter:
    """The cluster's router behind the simulator's interface: replica loads in, a replica id out,
    and the prefix-cache events it listens to (blocks stored and evicted on each replica)."""

    def __init__(self, router, module, replicas: Sequence[SimReplica]):
        self.router = router
        self.load_type = module.ReplicaLoad
        for replica in replicas:
            self._watch(replica)

    def _watch(self, replica: SimReplica) -> None:
        pool, router, rid = replica.kv.pool, self.router, replica.replica_id
        stored = getattr(router, "on_blocks_stored", None)
        evicted = getattr(router, "on_blocks_evicted", None)
        if stored is not None:
            cache = pool.cache

            def cache_and_tell(block_id, block_hash):
                fresh = block_hash not in pool.cached
                cache(block_id, block_hash)
                if fresh and pool.cached.get(block_hash) == block_id:
                    stored(rid, [block_hash])
            pool.cache = cache_and_tell
        if evicted is not None:
            pool.on_evict = lambda block_id, block_hash: evicted(rid, [block_hash])

    def __call__(self, prompt_token_ids, user, replicas) -> int:
        loads = [self.load_type(r.replica_id, True, r.scheduler.num_running, r.scheduler.num_waiting,
                                max(0, r.queued_prefill_tokens), r.kv.num_free_blocks, r.kv.num_blocks)
                 for r in replicas]
        replica_id = self.router.route(list(prompt_token_ids), user, loads)
        on_routed = getattr(self.router, "on_request_routed", None)
        if on_routed is not None:
            on_routed(replica_id, len(prompt_token_ids))
        return replica_id


def make_router(name: str, replicas: Sequence[SimReplica], block_size: int) -> Router:
    """The built-in router `name`, else the cluster router's `name`; raises ValueError naming --router."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return least_loaded
    try:
        from punctual.cluster import router as cluster_router
    except ImportError:
        raise ValueError(f"--router: unknown {name!r}; choose from {', '.join(BUILTIN_ROUTERS)} "
                         "(punctual.cluster.router is not installed here)") from None
    try:
        router = cluster_router.make_router(name, block_size)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"--router: {exc}") from None
    return ClusterRouterAdapter(router, cluster_router, replicas)
