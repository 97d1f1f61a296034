"""When to move a running request to another replica, and where: the migration policy. Pure
Python (no torch, no Ray, no clock), like the router, so it is unit-tested and simulated alone.

The mechanism (pre-copy, stop-and-copy, fallbacks) is ClusterClient.migrate; this module only
decides. Load here is what a migration changes: the requests a replica is decoding. A move has a
cost (TransferCost, learned from the moves made) that it must earn back: a rebalancing move of a
request about to finish is not worth its copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from punctual.cluster.router import ReplicaLoad

# Pre-copy (Llumnix): copy the full blocks while the request keeps decoding, again for the blocks
# filled meanwhile, and stop for the final copy once a round found this few new blocks (or after
# MAX_PRECOPY_ROUNDS): the stall is then one short copy.
STOP_AND_COPY_BLOCKS = 1
MAX_PRECOPY_ROUNDS = 4
# A replica's step time is the gap between its output updates; a longer gap was an idle spell.
MAX_STEP_GAP_S = 2.0
PRIOR_STEP_S = 0.05  # a CPU decode step of the builtin model, until one is seen


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


def pick_request(candidates: dict[str, int], transfer_s: dict[str, float] | None = None,
                 gain_s: dict[str, float] | None = None) -> str | None:
    """Which running request to move: the one with the fewest tokens (least KV to copy), as
    Llumnix, among those whose predicted transfer takes less than the move gains (when given)."""
    if transfer_s is not None and gain_s is not None:
        candidates = {i: n for i, n in candidates.items() if transfer_s[i] < gain_s[i]}
    if not candidates:
        return None
    return min(candidates, key=lambda request_id: (candidates[request_id], request_id))


# ---- what a move costs, and what it gains -------------------------------------------------------
@dataclass
class TransferCost:
    """seconds ~= fixed_s + per_block_s * blocks for one KV copy round of a move (the source
    encodes, the transport carries, the target decodes), learned from completed rounds with
    decayed least squares (like the scheduler's StepCostModel); a prior until enough were seen.
    The prior is a CPU-sized guess for the builtin model (bench_kv_moves.py, relay)."""

    fixed_s: float = 0.01
    per_block_s: float = 0.001
    decay: float = 0.95  # weight of the past per observation (~20-round memory)
    min_observations: int = 4
    num_observations: int = 0
    bytes_per_block: float = 0.0  # latest seen: turns per_block_s into a bandwidth
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5, repr=False)

    def predict(self, blocks: int) -> float:
        return self.fixed_s + self.per_block_s * blocks

    def observe(self, blocks: int, seconds: float, nbytes: int = 0) -> None:
        s, d = self._sums, self.decay
        for i, value in enumerate((1.0, float(blocks), float(blocks) ** 2, seconds, blocks * seconds)):
            s[i] = s[i] * d + value
        self.num_observations += 1
        if blocks and nbytes:
            self.bytes_per_block = nbytes / blocks
        if self.num_observations < self.min_observations:
            return
        n, x, xx, y, xy = s
        det = n * xx - x * x
        if det <= 1e-9 * max(1.0, n * xx):  # every round the same size: only the mean is known
            self.per_block_s = max(0.0, (y - self.fixed_s * n) / x) if x else self.per_block_s
            return
        per_block = (n * xy - x * y) / det
        fixed = (y - per_block * x) / n
        if per_block > 0 and fixed >= 0:
            self.per_block_s, self.fixed_s = per_block, fixed
        else:  # noise made a line through nothing: keep the rate, refit through the origin
            self.per_block_s, self.fixed_s = max(0.0, xy / xx) if xx else self.per_block_s, 0.0

    def as_dict(self) -> dict:
        mb_per_s = self.bytes_per_block / self.per_block_s / 1e6 if self.per_block_s and self.bytes_per_block else None
        return {"fixed_s": self.fixed_s, "per_block_s": self.per_block_s, "mb_per_s": mb_per_s,
                "observations": self.num_observations}


def rebalance_gain_s(remaining_tokens: int, step_s: float | None, source_running: int, target_load: int) -> float:
    """Seconds a rebalancing move saves its request: each remaining token costs a source step;
    assuming a step's cost grows with its batch (the case rebalancing is for), a target step costs
    (target_load + 1) / source_running of that. Unknown step time: no evidence against moving."""
    if step_s is None:
        return float("inf")
    if source_running <= 0:
        return 0.0
    return remaining_tokens * step_s * max(0.0, 1.0 - (target_load + 1) / source_running)


def pick_decode(loads: list[ReplicaLoad], allowed: set[int], transfer_s: dict[int, float], step_s: float) -> int | None:
    """Prefill/decode: the decode replica where the request's KV arrives and decodes soonest: the
    predicted transfer to it plus its decode load in steps (ties: lowest id)."""
    candidates = [r for r in loads if r.healthy and r.replica_id in allowed]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (transfer_s.get(r.replica_id, 0.0) + decode_load(r) * step_s,
                                          decode_load(r), r.replica_id)).replica_id


# ---- room for a more important request (Llumnix) -------------------------------------------------
@dataclass
class Seat:
    """A request on a replica as the room policy sees it."""

    request_id: str
    priority: int  # lower is more important (the scheduler's priority policy)
    blocks_needed: int  # KV blocks it holds once done (prompt + its output limit)
    movable: bool  # running, and no move of it under way


def room_move(priority: int, blocks_needed: int, replica_id: int, seats: dict[int, list[Seat]],
              loads: list[ReplicaLoad]) -> tuple[str, int] | None:
    """A request of `priority` is about to join `replica_id`. When the requests there would then
    need more KV blocks than it has (a preemption ahead), the less important running request to
    move off, and where to (a healthy replica where it fits beside what that one's requests
    need), so nobody is preempted; None when no move is needed or none helps."""
    by_id = {r.replica_id: r for r in loads}
    here = by_id.get(replica_id)
    if here is None or not here.kv_blocks_total:
        return None
    shortfall = sum(s.blocks_needed for s in seats.get(replica_id, [])) + blocks_needed - here.kv_blocks_total
    if shortfall <= 0:
        return None
    victims = [s for s in seats.get(replica_id, []) if s.movable and s.priority > priority]
    if not victims:
        return None
    # The least important first; among those, the smallest that covers the shortfall (least KV
    # to copy), else the biggest (the most room it makes).
    worst = max(s.priority for s in victims)
    victims = [s for s in victims if s.priority == worst]
    covering = [s for s in victims if s.blocks_needed >= shortfall]
    victim = (min(covering, key=lambda s: (s.blocks_needed, s.request_id)) if covering
              else max(victims, key=lambda s: (s.blocks_needed, s.request_id)))
    rooms = {r.replica_id: r.kv_blocks_total - sum(s.blocks_needed for s in seats.get(r.replica_id, []))
             for r in loads if r.healthy and r.replica_id != replica_id and r.kv_blocks_total}
    fits = [rid for rid, room in rooms.items() if room >= victim.blocks_needed]
    if not fits:
        return None
    return victim.request_id, max(fits, key=lambda rid: (rooms[rid], -rid))


# ---- the decisions the cluster client and the simulator both take --------------------------------
def observe_step_gap(step_s: float | None, last_output_at: float | None, now: float) -> float | None:
    """A replica's decode step time after an output update at `now` (its previous one at
    `last_output_at`): the gap between updates, smoothed; a longer gap was an idle spell."""
    if last_output_at is None or now - last_output_at >= MAX_STEP_GAP_S:
        return step_s
    gap = now - last_output_at
    return gap if step_s is None else 0.8 * step_s + 0.2 * gap


def cluster_step_s(step_times: list[float | None]) -> float:
    """The cluster's decode step time: the median of the replicas' estimates, the prior without one."""
    known = sorted(s for s in step_times if s is not None)
    return known[len(known) // 2] if known else PRIOR_STEP_S


def blocks_needed(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, block_size: int) -> int:
    """KV blocks a request holds once done: its prompt and its whole output limit."""
    tokens = num_prompt_tokens + (max_tokens if max_tokens is not None else max_model_len)
    return -(-min(tokens, max_model_len) // block_size)


def rebalance_move(loads: list[ReplicaLoad], threshold: int, movable: Callable[[int], dict[str, int]],
                   transfer_s: Callable[[int, int, int], float], remaining_tokens: Callable[[str], int],
                   step_s: Callable[[int], float | None]) -> tuple[str, int, int] | None:
    """(request, source, target) of the rebalancing move to make now, or None: the pair by
    `rebalance_pair`, then the request on the source worth its copy (`pick_request`).
    movable(source): {request id: its tokens} of the source's requests that may move;
    transfer_s(source, target, tokens): a whole move's predicted copy time;
    remaining_tokens(request): what it may still generate; step_s(replica): its step time or None."""
    pair = rebalance_pair(loads, threshold)
    if pair is None:
        return None
    source, target = pair
    candidates = movable(source)
    by_id = {r.replica_id: r for r in loads}
    transfer = {i: transfer_s(source, target, n) for i, n in candidates.items()}
    source_step_s = step_s(source)
    gain = {i: rebalance_gain_s(remaining_tokens(i), source_step_s, by_id[source].num_running,
                                decode_load(by_id[target])) for i in candidates}
    request_id = pick_request(candidates, transfer, gain)
    return None if request_id is None else (request_id, source, target)
