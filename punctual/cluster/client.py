"""The front end's handle on a cluster of replicas: the surface of EngineCoreClient, over many.

AsyncEngine talks to this exactly as to one core (start, attach, add_request, abort_requests,
pin/unpin, shutdown, stats, pid). Each request goes to the replica the router picks; updates from
every replica arrive on the asyncio loop through one EngineCoreClient per replica (the same
framed socket protocol, over TCP).

When a replica dies (its socket reaches EOF), each of its unfinished requests is resubmitted to
another replica as prompt + the tokens already delivered, with max_tokens reduced by as many: the
client's stream goes on without a duplicated or a missing token, and a greedy stream is the same
as an undisturbed one. A request that cannot be resumed (structured output, whose grammar state
would have to be replayed; or no replica left) ends with an error. Ray restarts the replica; it
rejoins when its engine has loaded again, and gets the pins back.

Pins are broadcast: every replica computes and holds the prefix, so any may serve its users.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from punctual.cluster.router import NoReplicaAvailable, ReplicaLoad, make_router
from punctual.config import ClusterConfig, EngineConfig
from punctual.engine.client import CoreInfo, CoreUpdate, EngineCoreClient, EngineDeadError
from punctual.engine.stats import EngineStats
from punctual.engine.wire import PinAck
from punctual.request import EngineCoreRequest

logger = logging.getLogger(__name__)


@dataclass
class Replica:
    replica_id: int
    client: EngineCoreClient | None = None
    state: str = "starting"  # starting | ready | restarting | dead | stopped
    host: str = ""
    pid: int | None = None
    request_ids: set[str] = field(default_factory=set)
    # Pins and unpins sent to this replica, in order, awaiting its acks (None: a re-pin after a
    # restart, whose ack nobody waits for).
    pin_queue: deque = field(default_factory=deque)

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass
class RoutedRequest:
    request: EngineCoreRequest  # as first submitted
    replica_id: int
    delivered: list[int] = field(default_factory=list)  # tokens handed to the front end so far
    started: bool = False  # its first token arrived (no longer queued prefill)


@dataclass
class PinOp:
    """A pin or unpin broadcast to several replicas: answered once every one of them has."""

    waiting: set[int]
    acks: list[PinAck] = field(default_factory=list)


def resumed_request(routed: RoutedRequest) -> EngineCoreRequest | None:
    """The request to run elsewhere so that its stream continues where it stopped; None when
    that cannot be done exactly (its grammar's state lives in the dead replica)."""
    original = routed.request
    params = original.sampling_params
    if params.structured is not None:
        return None
    done = len(routed.delivered)
    if not done:
        return original
    max_tokens = None if params.max_tokens is None else params.max_tokens - done
    if max_tokens is not None and max_tokens < 1:
        return None  # its last token was delivered without a finish: nothing left to resume
    params = dataclasses.replace(params, max_tokens=max_tokens, min_tokens=max(0, params.min_tokens - done))
    return dataclasses.replace(original, prompt_token_ids=list(original.prompt_token_ids) + routed.delivered,
                               sampling_params=params)


class ClusterClient:
    def __init__(self, config: EngineConfig, cluster: ClusterConfig):
        from punctual.cluster.launch import RayReplicas

        self.config = config
        self.cluster = cluster
        self.launcher = RayReplicas(config, cluster)
        self.router = make_router(cluster.router, config.cache.block_size, **cluster.router_options)
        self.replicas = [Replica(i) for i in range(cluster.replicas)]
        self.requests: dict[str, RoutedRequest] = {}
        self.pins: dict[str, list[int]] = {}  # pinned prefixes, re-sent to a restarted replica
        self._pin_ops: deque[PinOp] = deque()
        self.info: CoreInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_update: Callable[[CoreUpdate], None] | None = None
        self._closing = False
        self.num_resumed = 0  # requests moved to another replica after a death
        self.num_lost = 0  # requests ended with an error because they could not be moved

    # ---- EngineCoreClient's surface ---------------------------------------------------------
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
    def stats(self) -> EngineStats | None:
        """The cluster's totals (counters and gauges summed over replicas)."""
        reports = [s for s in self.replica_stats.values()]
        if not reports:
            return None
        total = {}
        for f in dataclasses.fields(EngineStats):
            values = [getattr(s, f.name) for s in reports]
            total[f.name] = sum(values) if all(isinstance(v, int) for v in values) else values[0]
        return EngineStats(**total)

    @property
    def replica_stats(self) -> dict[str, EngineStats]:
        return {str(r.replica_id): r.client.stats for r in self.replicas
                if r.ready and r.client.stats is not None}

    def replica_info(self) -> list[dict]:
        """One item per replica for GET /admin/replicas."""
        items = []
        for r in self.replicas:
            stats = r.client.stats if r.ready else None
            items.append({"id": r.replica_id, "pid": r.pid, "node": r.host, "state": r.state,
                          "running": stats.num_running if stats else 0,
                          "waiting": stats.num_waiting if stats else 0,
                          "kv_blocks_used": stats.kv_blocks_used if stats else 0,
                          "kv_blocks_total": stats.kv_blocks_total if stats else 0})
        return items

    def start(self, timeout: float | None = None) -> CoreInfo:
        """Start the replicas (blocking) and connect to each; the first one's CoreInfo stands for all,
        with the tightest request limit."""
        self.launcher.start()
        try:
            infos = [self._connect(r, timeout) for r in self.replicas]
        except BaseException:
            self.launcher.shutdown()
            raise
        self.info = dataclasses.replace(infos[0], max_request_tokens=min(i.max_request_tokens for i in infos))
        return self.info

    def _connect(self, replica: Replica, timeout: float | None, not_pid: int | None = None) -> CoreInfo:
        host, port, pid = self.launcher.address(replica.replica_id, timeout, not_pid)
        client = EngineCoreClient(self.config)
        info = client.connect(host, port, timeout=30.0)
        replica.client, replica.host, replica.pid = client, host, pid
        return info

    async def attach(self, on_update: Callable[[CoreUpdate], None], on_death: Callable[[str], None]) -> None:
        """Deliver every replica's updates to `on_update`. A replica's death is handled here;
        `on_death` is not called: the cluster lives while any replica does."""
        self._loop = asyncio.get_running_loop()
        self._on_update = on_update
        self.launcher.restore_signal_handlers()  # on the loop: the main thread under uvicorn
        for replica in self.replicas:
            await self._attach(replica)

    async def _attach(self, replica: Replica) -> None:
        rid = replica.replica_id
        await replica.client.attach(lambda update: self._on_replica_update(rid, update),
                                    lambda reason: self._on_replica_death(rid, reason))
        replica.state = "ready"

    def add_request(self, request: EngineCoreRequest) -> None:
        try:
            replica = self._route(request)
        except NoReplicaAvailable as exc:
            raise EngineDeadError(str(exc)) from None
        self.requests[request.request_id] = RoutedRequest(request, replica.replica_id)
        self._send_to(replica, request)

    def _route(self, request: EngineCoreRequest) -> Replica:
        rid = self.router.route(request.prompt_token_ids, request.user, self._loads())
        self.router.on_request_routed(rid, len(request.prompt_token_ids))
        return self.replicas[rid]

    def _send_to(self, replica: Replica, request: EngineCoreRequest) -> None:
        replica.request_ids.add(request.request_id)
        self.requests[request.request_id].replica_id = replica.replica_id
        replica.client.add_request(request)

    def _loads(self) -> list[ReplicaLoad]:
        """Each replica's load as the front end counts it (exact and current: no report to wait
        for), with the KV numbers of its latest report."""
        loads = []
        for r in self.replicas:
            running = waiting = queued = 0
            for request_id in r.request_ids:
                routed = self.requests[request_id]
                if routed.started:
                    running += 1
                else:
                    waiting += 1
                    queued += len(routed.request.prompt_token_ids) + len(routed.delivered)
            stats = r.client.stats if r.ready else None
            loads.append(ReplicaLoad(r.replica_id, r.ready, running, waiting, queued,
                                     stats.kv_blocks_free if stats else 0, stats.kv_blocks_total if stats else 0))
        return loads

    def abort_requests(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            routed = self.requests.pop(request_id, None)
            if routed is not None:
                by_replica.setdefault(routed.replica_id, []).append(request_id)
        for rid, ids in by_replica.items():
            replica = self.replicas[rid]
            replica.request_ids.difference_update(ids)
            if replica.ready:
                replica.client.abort_requests(ids)

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int]) -> None:
        self.pins[pin_id] = list(prompt_token_ids)
        self._broadcast_pin(lambda client: client.pin_prefix(pin_id, prompt_token_ids))

    def unpin_prefix(self, pin_id: str) -> None:
        self.pins.pop(pin_id, None)
        self._broadcast_pin(lambda client: client.unpin_prefix(pin_id))

    def _broadcast_pin(self, send: Callable[[EngineCoreClient], None]) -> None:
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            raise EngineDeadError("no replica of the cluster is running")
        op = PinOp({r.replica_id for r in ready})
        self._pin_ops.append(op)
        for replica in ready:
            replica.pin_queue.append(op)
            send(replica.client)

    # ---- replica events (on the loop) -------------------------------------------------------
    def _on_replica_update(self, rid: int, update: CoreUpdate) -> None:
        replica = self.replicas[rid]
        if update.blocks_stored:
            self.router.on_blocks_stored(rid, update.blocks_stored)
        if update.blocks_evicted:
            self.router.on_blocks_evicted(rid, update.blocks_evicted)
        for ack in update.pin_acks:
            op = replica.pin_queue.popleft()
            if op is not None:
                op.acks.append(ack)
                op.waiting.discard(rid)
        for output in update.outputs:
            routed = self.requests.get(output.request_id)
            if routed is None or routed.replica_id != rid:
                continue
            routed.started = routed.started or bool(output.new_token_ids)
            routed.delivered.extend(output.new_token_ids)
            if output.finish_reason is not None:
                self._forget(output.request_id)
        for request_id in update.rejected:
            self._forget(request_id)
        self._on_update(CoreUpdate(update.outputs, None, update.rejected, self._answered_pins()))
        if self.config.check_integrity:
            self.check_integrity()

    def _forget(self, request_id: str) -> None:
        routed = self.requests.pop(request_id, None)
        if routed is not None:
            self.replicas[routed.replica_id].request_ids.discard(request_id)

    def _answered_pins(self) -> list[PinAck]:
        """Answers to broadcast pins that every replica has acked, in order: the first refusal, else the first ack."""
        acks = []
        while self._pin_ops and not self._pin_ops[0].waiting:
            op = self._pin_ops.popleft()
            refusals = [a for a in op.acks if not a.ok]
            if refusals:
                acks.append(refusals[0])
            elif op.acks:
                acks.append(op.acks[0])
            else:
                acks.append(PinAck("", False, 503, "every replica died before answering"))
        return acks

    def _on_replica_death(self, rid: int, reason: str) -> None:
        replica = self.replicas[rid]
        if self._closing:
            replica.state = "stopped"
            return
        logger.error("replica %d (pid %s) is gone: %s; resuming its %d requests elsewhere",
                     rid, replica.pid, reason, len(replica.request_ids))
        replica.state = "restarting"
        self.router.remove_replica(rid)
        for op in replica.pin_queue:
            if op is not None:
                op.waiting.discard(rid)
        replica.pin_queue.clear()
        lost: dict[str, str] = {}
        orphans = sorted(replica.request_ids, key=lambda i: self.requests[i].request.arrival_time)
        replica.request_ids = set()
        for request_id in orphans:
            routed = self.requests[request_id]
            resumed = resumed_request(routed)
            try:
                if resumed is None:
                    raise NoReplicaAvailable("it cannot be resumed on another replica (structured output)")
                target = self._route(resumed)
            except NoReplicaAvailable as exc:
                lost[request_id] = f"replica {rid} died and the request was lost: {exc}"
                self._forget(request_id)
                continue
            routed.started = False  # it prefills again there
            self._send_to(target, resumed)
            self.num_resumed += 1
        self.num_lost += len(lost)
        self._on_update(CoreUpdate([], None, {}, self._answered_pins(), lost=lost))
        if self.config.check_integrity:
            self.check_integrity()
        asyncio.ensure_future(self._rejoin(replica, replica.pid))

    async def _rejoin(self, replica: Replica, dead_pid: int | None) -> None:
        """Wait for Ray to restart the replica, reconnect, and give it the pins back."""
        try:
            await asyncio.to_thread(self._connect, replica, self.cluster.start_timeout_s, dead_pid)
        except Exception as exc:  # out of restarts, or shut down meanwhile
            if not self._closing:
                logger.error("replica %d will not come back: %s", replica.replica_id, exc)
            replica.state = "dead" if not self._closing else "stopped"
            return
        if self._closing:
            return
        await self._attach(replica)
        for pin_id, token_ids in self.pins.items():
            replica.pin_queue.append(None)
            replica.client.pin_prefix(pin_id, token_ids)
        logger.info("replica %d is back (pid %s)", replica.replica_id, replica.pid)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Tell every replica to abort its requests, then kill the actors and stop Ray if it is ours."""
        self._closing = True
        await asyncio.gather(*(r.client.shutdown(timeout) for r in self.replicas if r.client is not None))
        for replica in self.replicas:
            replica.state = "stopped"
        await asyncio.to_thread(self.launcher.shutdown)

    def check_integrity(self) -> None:
        self.router.check_integrity()
        for r in self.replicas:
            for request_id in r.request_ids:
                assert self.requests[request_id].replica_id == r.replica_id, f"{request_id} on two replicas"
        assert sum(len(r.request_ids) for r in self.replicas) == len(self.requests), "a request on no replica"
