"""The front end's handle on a cluster of replicas: the EngineClient surface (engine/protocol.py)
over many. Each request goes to the replica the router picks; updates from every replica arrive
on the asyncio loop through one EngineCoreClient per replica (the same framed socket protocol,
over TCP), and are dispatched here to the part whose job they concern:

    replica_set.py  start, connect, rejoin after a restart, shut down
    ledger.py       which replica holds which request; loads; routing
    pins.py         pins broadcast to every replica, answered once all acked
    failover.py     a dead replica's requests resumed elsewhere by recompute
    transport.py    kv_* commands, the KV transports, transfer-cost learning
    mover.py        one migration: reserve, pre-copy, stop-and-copy, commit
    placement.py    drain, prefill/decode moves, rebalancing, making room
    engine/tasks.py background tasks, kept; a failure logged and surfaced
"""
from __future__ import annotations

import asyncio
from typing import Callable

from punctual.cluster.failover import Failover
from punctual.cluster.ledger import Ledger
from punctual.cluster.mover import Mover
from punctual.cluster.pins import PinBroadcast
from punctual.cluster.placement import Placement
from punctual.cluster.replica_set import ReplicaSet
from punctual.cluster.router import NoReplicaAvailable
from punctual.cluster.state import Replica, RoutedRequest
from punctual.engine.tasks import BackgroundTasks
from punctual.cluster.transport import KVChannel
from punctual.config import ClusterConfig, EngineConfig
from punctual.engine.client import CoreInfo, CoreUpdate, EngineDeadError
from punctual.engine.stats import EngineStats
from punctual.engine.tasks import TaskFailures
from punctual.request import EngineCoreRequest


class ClusterClient:
    """Implements engine/protocol.py's EngineClient; adds the cluster's admin surface (replica
    info, drain, migrations)."""

    def __init__(self, config: EngineConfig, cluster: ClusterConfig):
        self.config = config
        self.cluster = cluster
        self.tasks = BackgroundTasks()
        self.replica_set = ReplicaSet(config, cluster)
        self.ledger = Ledger(self.replica_set)
        self.pins = PinBroadcast(self.replica_set)
        self.channel = KVChannel(self.replica_set)
        self.failover = Failover(self.ledger, self.pins, self.channel, self.tasks, self._deliver, self._attach)
        self.mover = Mover(self.ledger, self.channel, self.failover)
        self.placement = Placement(self.ledger, self.mover, self.failover, self.tasks)
        self._on_update: Callable[[CoreUpdate], None] | None = None

    # ---- what the parts hold, by the names the admin routes and tests use --------------------
    @property
    def replicas(self) -> list[Replica]:
        return self.replica_set.replicas

    @property
    def requests(self) -> dict[str, RoutedRequest]:
        return self.ledger.requests

    @property
    def info(self) -> CoreInfo | None:
        return self.replica_set.info

    @property
    def migrations(self) -> list[dict]:
        return self.mover.migrations

    @property
    def num_resumed(self) -> int:
        return self.failover.num_resumed

    @property
    def num_lost(self) -> int:
        return self.failover.num_lost

    async def migrate(self, request_id: str, target_id: int, reason: str = "") -> bool:
        return await self.mover.migrate(request_id, target_id, reason)

    async def drain(self, rid: int) -> dict:
        return await self.placement.drain(rid)

    # ---- EngineClient ------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        live = [r.pid for r in self.replicas if r.ready]
        return live[0] if live else None

    @property
    def is_alive(self) -> bool:
        return any(r.ready for r in self.replicas)

    @property
    def degraded(self) -> bool:
        return not all(r.ready for r in self.replicas)

    @property
    def dead_reason(self) -> str | None:
        return None if self.is_alive else "no replica of the cluster is running"

    @property
    def background_failures(self) -> TaskFailures:
        return self.tasks.failures

    @property
    def stats(self) -> EngineStats | None:
        """The cluster's totals (counters and gauges summed over replicas)."""
        reports = [s for s in self.replica_stats.values()]
        if not reports:
            return None
        return EngineStats.merged(reports)

    @property
    def replica_stats(self) -> dict[str, EngineStats]:
        return {str(r.replica_id): r.client.stats for r in self.replicas
                if r.ready and r.client.stats is not None}

    def replica_info(self) -> list[dict]:
        """One item per replica for GET /admin/replicas."""
        items = []
        for r in self.replicas:
            stats = r.client.stats if r.ready else None
            state = r.state
            if r.draining and r.ready:
                state = "draining" if r.request_ids else "drained"
            items.append({"id": r.replica_id, "pid": r.pid, "node": r.host, "state": state, "role": r.role,
                          "running": stats.num_running if stats else 0,
                          "waiting": stats.num_waiting if stats else 0,
                          "kv_blocks_used": stats.kv_blocks_used if stats else 0,
                          "kv_blocks_total": stats.kv_blocks_total if stats else 0})
        return items

    def start(self, timeout: float | None = None) -> CoreInfo:
        return self.replica_set.start(timeout)

    async def attach(self, on_update: Callable[[CoreUpdate], None], on_death: Callable[[str], None]) -> None:
        """Deliver every replica's updates to `on_update`. A replica's death is handled here;
        `on_death` is not called: the cluster lives while any replica does."""
        self._on_update = on_update
        self.replica_set.launcher.restore_signal_handlers()  # on the loop: the main thread under uvicorn
        for replica in self.replicas:
            await self._attach(replica)

    async def _attach(self, replica: Replica) -> None:
        await self.replica_set.attach(replica, self._on_replica_update, self.failover.on_death)

    def _deliver(self, update: CoreUpdate) -> None:
        self._on_update(update)

    def add_request(self, request: EngineCoreRequest) -> None:
        try:
            replica = self.ledger.route(request)
        except NoReplicaAvailable as exc:
            raise EngineDeadError(str(exc)) from None
        routed = RoutedRequest(request, replica.replica_id)
        self.requests[request.request_id] = routed
        move = self.placement.room_move(routed) if self.cluster.migration else None
        if move is None:
            self.ledger.send_to(replica, request)
        else:
            self.placement.hold_for_room(routed, *move)

    def abort_requests(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            routed = self.requests.pop(request_id, None)
            if routed is not None:
                by_replica.setdefault(routed.replica_id, []).append(request_id)
        for rid, ids in by_replica.items():
            replica = self.replicas[rid]
            replica.request_ids.difference_update(ids)  # a held request's abort reaches a core that never had it: a no-op
            if replica.ready:
                replica.client.abort_requests(ids)

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        self.pins.pin(pin_id, prompt_token_ids, cache_salt)

    def unpin_prefix(self, pin_id: str) -> None:
        self.pins.unpin(pin_id)

    def load_lora(self, lora_request) -> None:
        """Every replica reads and checks the adapter; answered once all have (a refusal names its replica)."""
        self.pins.load_lora(lora_request)

    def unload_lora(self, lora_int_id: int) -> None:
        self.pins.unload_lora(lora_int_id)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Tell every replica to abort its requests, end the background work, then kill the actors
        and stop Ray if it is ours."""
        await self.replica_set.shutdown(timeout)
        await self.tasks.cancel_all()  # the replicas are stopped: a move called off now sends nothing
        await self.replica_set.stop_actors()

    # ---- a replica's update (on the loop) ----------------------------------------------------
    def _on_replica_update(self, rid: int, update: CoreUpdate) -> None:
        replica = self.replicas[rid]
        if update.outputs:
            self.ledger.observe_outputs(replica)
        router = self.ledger.router
        if update.blocks_stored:
            router.on_blocks_stored(rid, update.blocks_stored)
        if update.blocks_evicted:
            router.on_blocks_evicted(rid, update.blocks_evicted)
        self.pins.on_acks(replica, update.pin_acks)
        outputs = []  # what the front end gets: nothing from a replica a request has left (moved, resumed)
        for output in update.outputs:
            routed = self.ledger.record_output(rid, output)
            if routed is None:
                continue
            outputs.append(output)
            if output.finish_reason is not None:
                self.ledger.forget(output.request_id)
            else:
                self.placement.after_first_token(routed, replica.role)
        self.channel.on_answers(update.kv_answers)
        if self.cluster.migration and update.outputs:
            self.placement.maybe_rebalance()
        for request_id in update.rejected:
            self.ledger.forget(request_id)
        self._deliver(CoreUpdate(outputs, None, update.rejected, self.pins.answered()))
        if self.config.check_integrity:
            self.check_integrity()

    def check_integrity(self) -> None:
        self.ledger.check_integrity()
