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

KV moves between replicas (migrate) by one of three transports (--kv-transport): relay (the
source's kv_* answer carries the payload, already encoded, and the front end sends it on over the
target's socket), object-store (the payload waits in the source actor; the front end has Ray
carry it to the target actor, handling only the ObjectRef), or direct (a shared-memory segment
that the target maps; only its name passes through here). Drain, rebalancing and making room for
a more important request (--migration on) and prefill/decode disaggregation are all migrations;
each copy round's time feeds the transfer's cost estimate that these decisions weigh.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from punctual.cluster import migration as policy
from punctual.cluster.router import NoReplicaAvailable, ReplicaLoad, make_router
from punctual.config import ClusterConfig, EngineConfig
from punctual.engine.client import CoreInfo, CoreUpdate, EngineCoreClient, EngineDeadError
from punctual.engine.messages import KVAnswer, PinAck
from punctual.engine.stats import EngineStats
from punctual.request import EngineCoreRequest
from punctual.wire.kv import StagedKV

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
    role: str = "mixed"  # mixed | prefill | decode
    draining: bool = False  # no new requests; its running ones were moved off
    step_s: float | None = None  # its decode step time, as seen from here (between output updates)
    last_output_at: float | None = None

    @property
    def routable(self) -> bool:
        return self.state == "ready" and not self.draining

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass
class RoutedRequest:
    request: EngineCoreRequest  # as first submitted
    replica_id: int
    delivered: list[int] = field(default_factory=list)  # tokens handed to the front end so far
    started: bool = False  # its first token arrived (no longer queued prefill)
    migrating: bool = False  # a migration of it is under way
    pd_moved: bool = False  # prefill/decode: its move to a decode replica was tried
    held: bool = False  # not sent yet: a less important request is being moved off to make room


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
        # The router hashes prompts as the replicas do, or it would never see a prefix they hold.
        self.router = make_router(cluster.router, config.cache.block_size,
                                  hash_algo=config.cache.prefix_caching_hash_algo, **cluster.router_options)
        self.replicas = [Replica(i) for i in range(cluster.replicas)]
        self.requests: dict[str, RoutedRequest] = {}
        # Pinned prefixes (tokens, cache salt), re-sent to a restarted replica.
        self.pins: dict[str, tuple[list[int], str | None]] = {}
        self._pin_ops: deque[PinOp] = deque()
        self.info: CoreInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_update: Callable[[CoreUpdate], None] | None = None
        self._closing = False
        self.num_resumed = 0  # requests moved to another replica after a death
        self.num_lost = 0  # requests ended with an error because they could not be moved
        self.disaggregated = cluster.prefill_replicas > 0
        if self.disaggregated:
            for r in self.replicas:
                r.role = "prefill" if r.replica_id < cluster.prefill_replicas else "decode"
        self._kv_ops: dict[int, tuple[int, asyncio.Future]] = {}  # op_id -> (replica, answer)
        self._op_ids = itertools.count()
        self._rebalancing = False
        self.migrations: list[dict] = []  # one record per finished migration attempt (GET /admin/migrations)
        self.transfer_costs: dict[str, policy.TransferCost] = {}  # per transport used: one copy round's cost

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
        info = client.connect(host, port, timeout=30.0, secret=self.launcher.secret)
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
        routed = RoutedRequest(request, replica.replica_id)
        self.requests[request.request_id] = routed
        move = self._room_move(routed) if self.cluster.migration else None
        if move is None:
            self._send_to(replica, request)
            return
        # Hold it until the less important request is gone (or the move failed): sent now, the
        # scheduler could preempt that one for it before the move ends.
        routed.held = True
        replica.request_ids.add(request.request_id)
        asyncio.ensure_future(self._make_room(routed, *move))

    def _blocks_needed(self, routed: RoutedRequest) -> int:
        """KV blocks a request holds once done: its prompt and its whole output limit."""
        return policy.blocks_needed(len(routed.request.prompt_token_ids), routed.request.sampling_params.max_tokens,
                                    self.info.max_model_len, self.config.cache.block_size)

    def _room_move(self, routed: RoutedRequest) -> tuple[str, int] | None:
        seats = {r.replica_id: [policy.Seat(i, self.requests[i].request.priority, self._blocks_needed(self.requests[i]),
                                            self.requests[i].started and not self.requests[i].migrating)
                                for i in r.request_ids] for r in self.replicas}
        roles = {"decode"} if self.disaggregated else None  # P/D: a request moved off goes on decoding
        return policy.room_move(routed.request.priority, self._blocks_needed(routed), routed.replica_id,
                                seats, self._loads(roles))

    async def _make_room(self, routed: RoutedRequest, victim_id: str, target_id: int) -> None:
        try:
            await self.migrate(victim_id, target_id, "priority")
        finally:
            request_id = routed.request.request_id
            if routed.held and self.requests.get(request_id) is routed:  # not aborted, nor resumed by a death
                routed.held = False
                replica = self.replicas[routed.replica_id]
                if replica.ready:
                    self._send_to(replica, routed.request)
                else:
                    self._resume_by_recompute(request_id)

    def _route(self, request: EngineCoreRequest) -> Replica:
        rid = self.router.route(request.prompt_token_ids, request.user, self._loads({"mixed", "prefill"}),
                                cache_salt=request.cache_salt)
        self.router.on_request_routed(rid, len(request.prompt_token_ids))
        return self.replicas[rid]

    def _send_to(self, replica: Replica, request: EngineCoreRequest) -> None:
        replica.request_ids.add(request.request_id)
        routed = self.requests[request.request_id]
        routed.replica_id, routed.held = replica.replica_id, False
        replica.client.add_request(request)

    def _loads(self, roles: set[str] | None = None) -> list[ReplicaLoad]:
        """Each replica's load as the front end counts it (exact and current: no report to wait
        for), with the KV numbers of its latest report. Draining replicas, and those whose role is
        not in `roles`, are unhealthy: nothing is routed there."""
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
            healthy = r.routable and (roles is None or r.role in roles)
            loads.append(ReplicaLoad(r.replica_id, healthy, running, waiting, queued,
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
            replica.request_ids.difference_update(ids)  # a held request's abort reaches a core that never had it: a no-op
            if replica.ready:
                replica.client.abort_requests(ids)

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        self.pins[pin_id] = (list(prompt_token_ids), cache_salt)
        self._broadcast_pin(lambda client: client.pin_prefix(pin_id, prompt_token_ids, cache_salt))

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
        if update.outputs:
            now = time.monotonic()
            replica.step_s = policy.observe_step_gap(replica.step_s, replica.last_output_at, now)
            replica.last_output_at = now
        if update.blocks_stored:
            self.router.on_blocks_stored(rid, update.blocks_stored)
        if update.blocks_evicted:
            self.router.on_blocks_evicted(rid, update.blocks_evicted)
        for ack in update.pin_acks:
            op = replica.pin_queue.popleft()
            if op is not None:
                op.acks.append(ack)
                op.waiting.discard(rid)
        outputs = []  # what the front end gets: nothing from a replica a request has left (moved, resumed)
        for output in update.outputs:
            routed = self.requests.get(output.request_id)
            if routed is None or routed.replica_id != rid:
                continue
            outputs.append(output)
            routed.started = routed.started or bool(output.new_token_ids)
            routed.delivered.extend(output.new_token_ids)
            if output.finish_reason is not None:
                self._forget(output.request_id)
            elif (self.disaggregated and routed.started and not routed.pd_moved
                  and replica.role == "prefill"):
                routed.pd_moved = True  # its first token exists: decoding goes on elsewhere
                asyncio.ensure_future(self._to_decode(output.request_id))
        for answer in update.kv_answers:
            _, future = self._kv_ops.pop(answer.op_id, (None, None))
            if future is not None and not future.done():  # None: a fire-and-forget kv_abort_import
                future.set_result(answer)
        if self.cluster.migration and not self._rebalancing and update.outputs:
            self._maybe_rebalance()
        for request_id in update.rejected:
            self._forget(request_id)
        self._on_update(CoreUpdate(outputs, None, update.rejected, self._answered_pins()))
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
        for op_id, (op_rid, future) in list(self._kv_ops.items()):
            if op_rid == rid:
                del self._kv_ops[op_id]
                if not future.done():
                    future.set_exception(EngineDeadError(f"replica {rid} died"))
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

    # ---- moving requests between replicas ---------------------------------------------------
    async def _kv(self, rid: int, kind: str, *args) -> KVAnswer:
        """Send one kv_* command to a replica and wait for its answer (EngineDeadError if it dies)."""
        replica = self.replicas[rid]
        if not replica.ready:
            raise EngineDeadError(f"replica {rid} is not running")
        op_id = next(self._op_ids)
        future = asyncio.get_running_loop().create_future()
        self._kv_ops[op_id] = (rid, future)
        replica.client.kv_command(kind, (op_id, *args))
        return await future

    def _transport(self, source_id: int, target_id: int) -> str:
        """The transport a move between these two replicas takes: the configured one, except that
        a shared-memory segment cannot reach another host, nor the object store replicas that are
        not Ray actors (cluster/inprocess.py): relay then."""
        transport = self.cluster.kv_transport
        if transport == "direct" and self.replicas[source_id].host != self.replicas[target_id].host:
            return "relay"
        if transport == "object-store" and not getattr(self.launcher, "actors", None):
            return "relay"
        return transport

    def transfer_cost(self, transport: str) -> policy.TransferCost:
        return self.transfer_costs.setdefault(transport, policy.TransferCost())

    def predicted_transfer_s(self, source_id: int, target_id: int, num_tokens: int) -> float:
        """A whole move's copy time (every block of `num_tokens`), as the estimate stands."""
        blocks = -(-num_tokens // self.config.cache.block_size)
        return self.transfer_cost(self._transport(source_id, target_id)).predict(blocks)

    async def _carry(self, source_id: int, target_id: int, payload) -> None:
        """Object store: have Ray move a staged payload from the source actor to the target actor.
        The ObjectRef is the front end's (freed when dropped); the arrays never come here."""
        if not isinstance(payload, StagedKV):
            return  # relay: it rides in the kv_receive command; direct: only the segment's name does
        actors = self.launcher.actors
        try:
            await actors[target_id].stage_kv.remote(payload.key, actors[source_id].take_kv.remote(payload.key))
        except Exception as exc:  # an actor died or the store refused: the move is off
            raise EngineDeadError(f"the object store did not carry the KV: {exc}") from exc

    def _discard(self, payload, *replica_ids: int) -> None:
        """Drop a payload a called-off move left behind (a segment, a staged entry), on each side."""
        if payload is None or isinstance(payload, bytes):
            return
        for rid in replica_ids:
            if self.replicas[rid].ready:
                self.replicas[rid].client.kv_command("kv_discard", (next(self._op_ids), payload))

    async def migrate(self, request_id: str, target_id: int, reason: str = "") -> bool:
        """Move a running request to `target_id` with its KV (multi-stage pre-copy, then one
        stop-and-copy). True when it runs there. On a refusal or a failure before the source let it
        go, it simply goes on at the source; after (the target refused the commit), it is resumed
        by recompute, on the source if it can take it."""
        routed = self.requests.get(request_id)
        if routed is None or routed.migrating or not routed.started or routed.replica_id == target_id:
            return False
        source_id = routed.replica_id
        transport = self._transport(source_id, target_id)
        cost = self.transfer_cost(transport)
        num_tokens = len(routed.request.prompt_token_ids) + len(routed.delivered)
        record = {"request_id": request_id, "source": source_id, "target": target_id, "reason": reason,
                  "ok": False, "precopy_blocks": 0, "final_blocks": 0, "transport": transport,
                  "predicted_transfer_s": self.predicted_transfer_s(source_id, target_id, num_tokens),
                  "transfer_s": 0.0, "transfer_bytes": 0, "core_s": 0.0}
        routed.migrating = True
        reserved = False
        block_size = self.config.cache.block_size
        int8 = self.cluster.kv_transfer_int8
        in_flight = None  # a payload sent and not yet taken by the target: dropped if the move is off

        async def copy_round(export: KVAnswer, command: str, *args) -> KVAnswer:
            """Carry one exported payload to the target and hand it over; times the round."""
            nonlocal in_flight
            in_flight = export.payload
            await self._carry(source_id, target_id, export.payload)
            answer = await self._kv(target_id, command, *args)
            if answer.ok:
                in_flight = None
            seconds = time.monotonic() - round_started
            record["transfer_s"] += seconds
            record["transfer_bytes"] += export.nbytes
            record["core_s"] += export.seconds + answer.seconds  # encoding at the source, decoding at the target
            if export.num_blocks:
                cost.observe(export.num_blocks, seconds, export.nbytes)
            return answer

        def still_ours() -> bool:
            return self.requests.get(request_id) is routed and routed.replica_id == source_id

        started = time.monotonic()
        try:
            answer = await self._kv(target_id, "kv_reserve", request_id, -(-num_tokens // block_size))
            reserved = True  # a refused reservation holds nothing, and aborting it is harmless
            if not answer.ok or not still_ours():
                record["error"] = "the target has no room" if not answer.ok else "gone meanwhile"
                return False
            copied = 0
            for _ in range(policy.MAX_PRECOPY_ROUNDS):  # the request keeps decoding at the source
                round_started = time.monotonic()
                answer = await self._kv(source_id, "kv_export", request_id, copied, None, int8, transport)
                if not answer.ok or not still_ours() or not answer.num_blocks:
                    self._discard(answer.payload, source_id)  # off, or an empty payload: nothing to carry
                if not answer.ok or not still_ours():
                    record["error"] = answer.error or "gone meanwhile"
                    return False
                if answer.num_blocks:
                    received = await copy_round(answer, "kv_receive", request_id, copied, answer.payload)
                    if not received.ok or not still_ours():
                        record["error"] = received.error or "gone meanwhile"
                        return False
                    copied += answer.num_blocks
                if answer.num_blocks <= policy.STOP_AND_COPY_BLOCKS:
                    break
            record["precopy_blocks"] = copied
            stopped = round_started = time.monotonic()
            out = await self._kv(source_id, "kv_migrate_out", request_id, copied, int8, transport)
            if not out.ok or not still_ours():  # finished or preempted meanwhile: it stays
                self._discard(out.payload, source_id)
                record["error"] = out.error or "gone meanwhile"
                return False
            record["final_blocks"] = out.num_blocks
            source, target = self.replicas[source_id], self.replicas[target_id]
            if not target.ready:  # it died meanwhile: the source let go, so recompute there
                self._discard(out.payload, source_id)
                record["error"] = f"replica {target_id} died"
                self._resume_by_recompute(request_id, prefer=source_id)
                return False
            # Every token the source made came before this answer: the target's come next. Map the
            # request to the target before its first output can arrive (a death of the target from
            # now on finds it there and resumes it like its other requests).
            source.request_ids.discard(request_id)
            target.request_ids.add(request_id)
            routed.replica_id = target_id
            reserved = False  # commit_import adopts the blocks or releases them
            committed = await copy_round(out, "kv_commit", out.state, copied, out.payload)
            if self.requests.get(request_id) is not routed:  # the client went away meanwhile
                if committed.ok:
                    target.client.abort_requests([request_id])
                return False
            if not committed.ok:
                record["error"] = "the target refused the commit"
                target.request_ids.discard(request_id)
                self._resume_by_recompute(request_id, prefer=source_id)
                return False
            record.update(ok=True, downtime_s=time.monotonic() - stopped)
            return True
        except EngineDeadError as exc:
            # A replica died: its death handler resumed whatever it held (the request is mapped to
            # the source until the commit is sent, to the target after).
            record["error"] = str(exc)
            return False
        finally:
            routed.migrating = False
            self._discard(in_flight, source_id, target_id)
            if reserved and self.replicas[target_id].ready:
                self.replicas[target_id].client.kv_command("kv_abort_import", (next(self._op_ids), request_id))
            record["seconds"] = time.monotonic() - started
            record["estimate"] = cost.as_dict()  # the copy cost as learned so far, this move included
            self.migrations.append(record)
            del self.migrations[:-1000]
            if not record["ok"]:
                logger.info("migration of %s from %d to %d did not happen: %s", request_id, source_id,
                            target_id, record.get("error"))

    def _resume_by_recompute(self, request_id: str, prefer: int | None = None) -> None:
        """Run a request elsewhere as prompt + delivered tokens (failover's way), on `prefer` when it
        can take it. Its old replica must no longer hold it (aborted, detached or dead)."""
        routed = self.requests[request_id]
        self.replicas[routed.replica_id].request_ids.discard(request_id)
        resumed = resumed_request(routed)
        try:
            if resumed is None:
                raise NoReplicaAvailable("it cannot be resumed on another replica (structured output)")
            if prefer is not None and self.replicas[prefer].routable:
                target = self.replicas[prefer]
            else:
                target = self._route(resumed)
        except NoReplicaAvailable as exc:
            self.requests.pop(request_id, None)
            self.num_lost += 1
            self._on_update(CoreUpdate([], None, {}, [], lost={request_id: f"the request could not be moved: {exc}"}))
            return
        routed.started = False
        self._send_to(target, resumed)
        self.num_resumed += 1

    async def drain(self, rid: int) -> dict:
        """Stop routing to replica `rid` and move every request off it: running ones with their
        KV, the others (waiting, or whose migration failed) by recompute elsewhere."""
        if not 0 <= rid < len(self.replicas):
            raise ValueError(f"replica_id must be between 0 and {len(self.replicas) - 1}, got {rid}")
        replica = self.replicas[rid]
        replica.draining = True
        allowed = {"decode"} if replica.role == "decode" else None
        migrated = recomputed = 0
        # Running requests first: the target's seats go to those whose KV would otherwise be recomputed.
        order = sorted(replica.request_ids,
                       key=lambda i: (not self.requests[i].started, self.requests[i].request.arrival_time))
        for request_id in order:
            routed = self.requests.get(request_id)
            if routed is None or routed.replica_id != rid:
                continue
            while routed.migrating:  # a P/D or rebalancing move is under way: let it end
                await asyncio.sleep(0.01)
            if routed.replica_id != rid or self.requests.get(request_id) is not routed:
                continue
            target = policy.least_loaded(self._loads(), allowed, exclude=rid)
            if routed.started and target is not None:
                if await self.migrate(request_id, target, "drain"):
                    migrated += 1
                    continue
                if self.requests.get(request_id) is routed and routed.replica_id != rid:
                    recomputed += 1  # the source had let it go: the migration resumed it by recompute
                    continue
            if self.requests.get(request_id) is routed and routed.replica_id == rid and replica.ready:
                replica.client.abort_requests([request_id])
                self._resume_by_recompute(request_id)
                recomputed += 1
        return {"id": rid, "migrated": migrated, "recomputed": recomputed, "left": len(replica.request_ids)}

    async def _to_decode(self, request_id: str) -> None:
        """Prefill/decode: move a request whose first token exists to the decode replica where it
        goes on soonest (its predicted transfer there, plus that replica's load in decode steps)."""
        routed = self.requests.get(request_id)
        if routed is None:
            return
        num_tokens = len(routed.request.prompt_token_ids) + len(routed.delivered)
        decode = [r.replica_id for r in self.replicas if r.role == "decode"]
        transfer_s = {rid: self.predicted_transfer_s(routed.replica_id, rid, num_tokens) for rid in decode}
        target = policy.pick_decode(self._loads(), set(decode), transfer_s, self._step_s())
        if target is not None:
            await self.migrate(request_id, target, "disaggregation")

    def _step_s(self) -> float:
        """The cluster's decode step time (the median of the replicas' latest estimates)."""
        return policy.cluster_step_s([r.step_s for r in self.replicas])

    def _maybe_rebalance(self) -> None:
        roles = {"decode"} if self.disaggregated else None
        decision = policy.rebalance_move(
            self._loads(roles), self.cluster.migration_threshold,
            lambda source: {i: len(self.requests[i].request.prompt_token_ids) + len(self.requests[i].delivered)
                            for i in self.replicas[source].request_ids
                            if self.requests[i].started and not self.requests[i].migrating},
            self.predicted_transfer_s, lambda i: self._remaining_tokens(self.requests[i]),
            lambda rid: self.replicas[rid].step_s)
        if decision is None:
            return
        request_id, _, target = decision
        self._rebalancing = True

        async def move() -> None:
            try:
                await self.migrate(request_id, target, "rebalance")
            finally:
                self._rebalancing = False

        asyncio.ensure_future(move())

    def _remaining_tokens(self, routed: RoutedRequest) -> int:
        """Tokens a request may still generate (its output limit less what it made: an upper bound)."""
        limit = routed.request.sampling_params.max_tokens
        if limit is None:
            limit = self.info.max_model_len - len(routed.request.prompt_token_ids)
        return max(0, limit - len(routed.delivered))

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
        for pin_id, (token_ids, cache_salt) in self.pins.items():
            replica.pin_queue.append(None)
            replica.client.pin_prefix(pin_id, token_ids, cache_salt)
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
