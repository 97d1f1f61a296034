"""Which replica gets an arriving request: the cluster's own router (`punctual.cluster.router`,
built by its `make_router`), fed what the cluster client feeds it.

The cluster client counts each replica's requests from the front end's side (a request is
running once its first token came back, waiting before) and passes the KV numbers of the
replica's latest report; the replicas' prefix-cache events reach the router as they happen. The
simulator keeps the same counts on each SimReplica (`front_running`, `front_waiting`,
`front_queued`) and hands the router the replicas whose state moved since its last decision
(`route(..., changed_only=True)`): a report equal to the last is no news, so the router
decides exactly as on the full list, without a pass over a thousand replicas per request.
"""
from __future__ import annotations

from typing import Sequence

from punctual.cluster.router import ReplicaLoad, Router, make_router
from punctual.sim.replica import SimReplica


def reads_blocks(router: Router) -> bool:
    """Whether `router` takes the replicas' block events (else only their loads)."""
    kind = type(router)
    return kind.on_blocks_stored is not Router.on_blocks_stored or kind.on_blocks_evicted is not Router.on_blocks_evicted


class FrontEnd:
    """The cluster client's routing, over simulated replicas. `routable`: the replicas that take
    arrivals (under prefill/decode, the prefill pool; the decode pool is unhealthy to the router)."""

    def __init__(self, name: str, replicas: Sequence[SimReplica], routable: Sequence[SimReplica], block_size: int,
                 options: dict | None = None):
        try:
            self.router = make_router(name, block_size, **(options or {}))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--router: {exc}") from None
        self.replicas = replicas
        self.routable = {r.replica_id for r in routable}
        self.changed: set[int] = {r.replica_id for r in replicas}  # every replica reports at the first decision
        for replica in replicas:
            replica.on_change = self.changed.add
            self._watch(replica)

    @property
    def reads_blocks(self) -> bool:
        """Whether the router takes the replicas' block events (else only their loads)."""
        return reads_blocks(self.router)

    def _watch(self, replica: SimReplica) -> None:
        """Tell the router of the blocks the replica's prefix cache indexes and evicts, as a core's
        updates do (blocks_stored, blocks_evicted)."""
        pool, router, rid = replica.kv.pool, self.router, replica.replica_id
        cache, untold = pool.cache, replica.untold_blocks

        def cache_and_tell(block_id, block_hash):
            fresh = block_hash not in pool.cached
            cache(block_id, block_hash)
            if fresh and pool.cached.get(block_hash) == block_id:
                looked_up = replica.lookup_hashes
                if looked_up is None or hash(block_hash) in looked_up:
                    router.on_blocks_stored(rid, [block_hash])
                else:  # no prompt of this run looks it up: held back (tell_untold)
                    untold.add(block_hash)

        def evict_and_tell(block_id, block_hash):
            untold.discard(block_hash)
            router.on_blocks_evicted(rid, [block_hash])  # the router may hold it from its own record
        pool.cache = cache_and_tell
        pool.on_evict = evict_and_tell

    def tell_untold(self) -> None:
        """Before a run: tell the router of the held-back blocks that some prompt of the run looks
        up (SimReplica.lookup_hashes; None: all of them). A router told only of blocks that some
        prompt can look up decides as one told of every block, and holds a fraction of them:
        under a decode-heavy load most cached blocks hold output tokens no prompt reaches."""
        for replica in self.replicas:
            untold = replica.untold_blocks
            if not untold:
                continue
            looked_up = replica.lookup_hashes
            tell = list(untold) if looked_up is None else [h for h in untold if hash(h) in looked_up]
            if tell:
                untold.difference_update(tell)
                self.router.on_blocks_stored(replica.replica_id, tell)

    def held_blocks(self) -> dict:
        """block hash -> the replicas the router holds it on, counting the blocks held back from it."""
        holders = {h: set(held) for h, held in getattr(self.router, "holders", {}).items()}
        for replica in self.replicas:
            for block_hash in replica.untold_blocks:
                holders.setdefault(block_hash, set()).add(replica.replica_id)
        return holders

    def load(self, replica: SimReplica) -> ReplicaLoad:
        """What the cluster client's `_loads` reports for this replica."""
        return ReplicaLoad(replica.replica_id, replica.replica_id in self.routable, replica.front_running,
                           replica.front_waiting, replica.front_queued, replica.kv_blocks_free(),
                           replica.kv.num_blocks, replica.adapters)

    def loads(self, roles: set[str] | None = None) -> list[ReplicaLoad]:
        """Every replica's load, healthy where its role is in `roles` (None: all), as `_loads(roles)`."""
        return [ReplicaLoad(r.replica_id, roles is None or r.role in roles, r.front_running, r.front_waiting,
                            r.front_queued, r.kv_blocks_free(), r.kv.num_blocks, r.adapters)
                for r in self.replicas]

    def route(self, prompt_token_ids: Sequence[int], user: str | None, adapter_id: str | None = None) -> int:
        """The replica for a request, as ClusterClient._route decides it."""
        replicas = self.replicas
        changed = [self.load(replicas[i]) for i in self.changed]
        self.changed.clear()
        replica_id = self.router.route(prompt_token_ids, user, changed, changed_only=True, adapter_id=adapter_id)
        self.router.on_request_routed(replica_id, len(prompt_token_ids))
        return replica_id
