"""Where running requests should be, and the moves that put them there: drain a replica, move a
prefilled request to a decode replica (prefill/decode disaggregation), rebalance the busiest
replica onto the idlest, and make room for a more important request (--migration on). The
policy (which request, where, whether it pays) is cluster/migration.py's; this is the mechanism."""
from __future__ import annotations

import asyncio

from punctual.cluster import migration as policy
from punctual.cluster.failover import Failover
from punctual.cluster.ledger import Ledger
from punctual.cluster.mover import Mover
from punctual.cluster.state import RoutedRequest
from punctual.engine.tasks import BackgroundTasks


class Placement:
    def __init__(self, ledger: Ledger, mover: Mover, failover: Failover, tasks: BackgroundTasks):
        self.ledger, self.mover, self.failover, self.tasks = ledger, mover, failover, tasks
        self.replicas = ledger.replicas
        self.cluster = self.replicas.cluster
        self._rebalancing = False  # one rebalancing move at a time

    # ---- making room for a more important request ---------------------------------------------
    def room_move(self, routed: RoutedRequest) -> tuple[str, int] | None:
        """(request to move off, where to) so that `routed` fits its replica without preempting a
        less important request; None when no such move is needed or possible."""
        requests, ledger = self.ledger.requests, self.ledger
        seats = {r.replica_id: [policy.Seat(i, requests[i].request.priority, ledger.blocks_needed(requests[i]),
                                            requests[i].started and not requests[i].migrating)
                                for i in r.request_ids] for r in self.replicas}
        roles = {"decode"} if self.replicas.disaggregated else None  # P/D: a request moved off goes on decoding
        return policy.room_move(routed.request.priority, ledger.blocks_needed(routed), routed.replica_id,
                                seats, ledger.loads(roles))

    def hold_for_room(self, routed: RoutedRequest, victim_id: str, target_id: int) -> None:
        """Hold `routed` (recorded, not sent) until the less important request is moved off (or the
        move failed): sent now, the scheduler could preempt that one for it before the move ends."""
        routed.held = True
        self.replicas[routed.replica_id].request_ids.add(routed.request.request_id)
        self.tasks.spawn(self._make_room(routed, victim_id, target_id), "make-room")

    async def _make_room(self, routed: RoutedRequest, victim_id: str, target_id: int) -> None:
        try:
            await self.mover.migrate(victim_id, target_id, "priority")
        finally:
            request_id = routed.request.request_id
            if routed.held and self.ledger.requests.get(request_id) is routed:  # not aborted, nor resumed by a death
                routed.held = False
                replica = self.replicas[routed.replica_id]
                if replica.ready:
                    self.ledger.send_to(replica, routed.request)
                else:
                    self.failover.resume_by_recompute(request_id)

    # ---- draining -----------------------------------------------------------------------------
    async def drain(self, rid: int) -> dict:
        """Stop routing to replica `rid` and move every request off it: running ones with their
        KV, the others (waiting, or whose migration failed) by recompute elsewhere."""
        if not 0 <= rid < len(self.replicas):
            raise ValueError(f"replica_id must be between 0 and {len(self.replicas) - 1}, got {rid}")
        requests = self.ledger.requests
        replica = self.replicas[rid]
        replica.draining = True
        allowed = {"decode"} if replica.role == "decode" else None
        migrated = recomputed = 0
        # Running requests first: the target's seats go to those whose KV would otherwise be recomputed.
        order = sorted(replica.request_ids, key=lambda i: (not requests[i].started, requests[i].request.arrival_time))
        for request_id in order:
            routed = requests.get(request_id)
            if routed is None or routed.replica_id != rid:
                continue
            while routed.migrating:  # a P/D or rebalancing move is under way: let it end
                await asyncio.sleep(0.01)
            if routed.replica_id != rid or requests.get(request_id) is not routed:
                continue
            target = policy.least_loaded(self.ledger.loads(), allowed, exclude=rid)
            if routed.started and target is not None:
                if await self.mover.migrate(request_id, target, "drain"):
                    migrated += 1
                    continue
                if requests.get(request_id) is routed and routed.replica_id != rid:
                    recomputed += 1  # the source had let it go: the migration resumed it by recompute
                    continue
            if requests.get(request_id) is routed and routed.replica_id == rid and replica.ready:
                replica.client.abort_requests([request_id])
                self.failover.resume_by_recompute(request_id)
                recomputed += 1
        return {"id": rid, "migrated": migrated, "recomputed": recomputed, "left": len(replica.request_ids)}

    # ---- prefill/decode disaggregation --------------------------------------------------------
    def after_first_token(self, routed: RoutedRequest, role: str) -> None:
        """A request's first token exists: on a prefill replica, its decoding goes on elsewhere."""
        if self.replicas.disaggregated and routed.started and not routed.pd_moved and role == "prefill":
            routed.pd_moved = True
            self.tasks.spawn(self._to_decode(routed.request.request_id), "to-decode")

    async def _to_decode(self, request_id: str) -> None:
        """Move the request to the decode replica where it goes on soonest (its predicted transfer
        there, plus that replica's load in decode steps)."""
        routed = self.ledger.requests.get(request_id)
        if routed is None:
            return
        channel = self.mover.channel
        decode = [r.replica_id for r in self.replicas if r.role == "decode"]
        transfer_s = {rid: channel.predicted_transfer_s(routed.replica_id, rid, routed.num_tokens) for rid in decode}
        target = policy.pick_decode(self.ledger.loads(), set(decode), transfer_s, self.ledger.step_s())
        if target is not None:
            await self.mover.migrate(request_id, target, "disaggregation")

    # ---- rebalancing --------------------------------------------------------------------------
    def maybe_rebalance(self) -> None:
        """--migration on: when the busiest replica runs enough more than the idlest, move the
        request whose move gains the most (one move at a time)."""
        if self._rebalancing:
            return
        ledger, requests, channel = self.ledger, self.ledger.requests, self.mover.channel
        roles = {"decode"} if self.replicas.disaggregated else None
        # The decision is migration.rebalance_move's, the one the simulator calls too.
        decision = policy.rebalance_move(
            ledger.loads(roles), self.cluster.migration_threshold,
            lambda source: {i: requests[i].num_tokens for i in self.replicas[source].request_ids
                            if requests[i].started and not requests[i].migrating},
            channel.predicted_transfer_s, lambda i: ledger.remaining_tokens(requests[i]),
            lambda rid: self.replicas[rid].step_s)
        if decision is None:
            return
        request_id, _, target = decision
        self._rebalancing = True
        self.tasks.spawn(self._rebalance(request_id, target), "rebalance")

    async def _rebalance(self, request_id: str, target: int) -> None:
        try:
            await self.mover.migrate(request_id, target, "rebalance")
        finally:
            self._rebalancing = False
