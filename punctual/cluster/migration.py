"""When to move a running request to another replica, and where: the migration policy. Pure
Python (no torch, no Ray, no clock), like the router, so it is unit-tested and simulated alone.

The mechanism (pre-copy, stop-and-copy, fallbacks) is ClusterClient.migrate; this module only
decides. Load here is what a migration changes: the requests a replica is decoding.
"""
from __future__ import annotations

from punctual.cluster.router import ReplicaLoad

# Pre-copy (Llumnix): copy the full blocks while the request keeps decoding, again for the blocks
# filled meanwhile, and stop for the final copy once a round found this few new blocks (or after
# MAX_PRECOPY_ROUNDS): the stall is then one short copy.
STOP_AND_COPY_BLOCKS = 1
MAX_PRECOPY_ROUNDS = 4


def decode_load(replica: ReplicaLoad) -> int:
    return replica.num_running + replica.num_waiting


def least_loaded(loads: list[ReplicaLoad], allowed: set[int] | None = None, exclude: int | None = None) -> int | None:
    """The healthy replica (in `allowed`, not `exclude`) with the fewest requests; ties: lowest id."""
    candidates = [r for r in loads if r.healthy and r.replica_id != exclude
                  and (allowed is None or r.replica_id in allowed)]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (decode_load(r), r.replica_id)).replica_id


def rebalance_pair(loads: list[ReplicaLoad], threshold: int) -> tuple[int, int] | None:
    """(source, target) when the busiest healthy replica runs `threshold` or more requests more
    than the least busy one; None otherwise. A move narrows the gap by two, so a threshold of 2
    or more never sends a request back and forth."""
    if threshold < 2:
        raise ValueError(f"threshold must be >= 2 (a smaller one moves requests back and forth), got {threshold}")
    healthy = [r for r in loads if r.healthy]
    if len(healthy) < 2:
        return None
    busiest = max(healthy, key=lambda r: (r.num_running, -r.replica_id))
    idlest = min(healthy, key=lambda r: (decode_load(r), r.replica_id))
    if busiest.replica_id == idlest.replica_id or busiest.num_running - decode_load(idlest) < threshold:
        return None
    return busiest.replica_id, idlest.replica_id


def pick_request(candidates: dict[str, int]) -> str | None:
    """Which running request to move: the one with the fewest tokens (least KV to copy), as Llumnix."""
    if not candidates:
        return None
    return min(candidates, key=lambda request_id: (candidates[request_id], request_id))
