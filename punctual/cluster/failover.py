"""When a replica dies (its socket reaches EOF), each of its unfinished requests is resubmitted
to another replica as prompt + the tokens already delivered, with max_tokens reduced by as many:
the client's stream goes on without a duplicated or a missing token, and a greedy stream is the
same as an undisturbed one. A request that cannot be resumed (structured output, whose grammar
state would have to be replayed; or no replica left) ends with an error. Ray restarts the
replica; it rejoins when its engine has loaded again, and gets the pins back."""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

from punctual.cluster.ledger import Ledger
from punctual.cluster.pins import PinBroadcast
from punctual.cluster.router import NoReplicaAvailable
from punctual.cluster.state import Replica, resumed_request
from punctual.engine.tasks import BackgroundTasks
from punctual.cluster.transport import KVChannel
from punctual.engine.client import CoreUpdate

logger = logging.getLogger(__name__)


class Failover:
    def __init__(self, ledger: Ledger, pins: PinBroadcast, channel: KVChannel, tasks: BackgroundTasks,
                 deliver: Callable[[CoreUpdate], None], attach: Callable[[Replica], Awaitable[None]]):
        """`deliver`: hands an update (lost requests, answered pins) to the front end;
        `attach`: delivers a reconnected replica's updates and death to the cluster client."""
        self.ledger = ledger
        self.replicas = ledger.replicas
        self.pins = pins
        self.channel = channel
        self.tasks = tasks
        self.deliver = deliver
        self.attach = attach
        self.num_resumed = 0  # requests moved to another replica after a death
        self.num_lost = 0  # requests ended with an error because they could not be moved

    def on_death(self, rid: int, reason: str) -> None:
        """Replica `rid` is gone: resume its requests elsewhere, answer what it owed, and wait for
        Ray to bring it back (a background task)."""
        replica = self.replicas[rid]
        if self.replicas.closing:
            replica.state = "stopped"
            return
        logger.error("replica %d (pid %s) is gone: %s; resuming its %d requests elsewhere",
                     rid, replica.pid, reason, len(replica.request_ids))
        replica.state = "restarting"
        self.ledger.router.remove_replica(rid)
        self.pins.on_death(replica)
        self.channel.on_death(rid)
        lost: dict[str, str] = {}
        requests = self.ledger.requests
        orphans = sorted(replica.request_ids, key=lambda i: requests[i].request.arrival_time)
        replica.request_ids = set()
        for request_id in orphans:
            routed = requests[request_id]
            resumed = resumed_request(routed)
            try:
                if resumed is None:
                    raise NoReplicaAvailable("it cannot be resumed on another replica (structured output)")
                target = self.ledger.route(resumed)
            except NoReplicaAvailable as exc:
                lost[request_id] = f"replica {rid} died and the request was lost: {exc}"
                self.ledger.forget(request_id)
                continue
            routed.started = False  # it prefills again there
            self.ledger.send_to(target, resumed)
            self.num_resumed += 1
        self.num_lost += len(lost)
        self.deliver(CoreUpdate([], None, {}, self.pins.answered(), lost=lost))
        if self.replicas.config.check_integrity:
            self.ledger.check_integrity()
        self.tasks.spawn(self.rejoin(replica, replica.pid), "rejoin")

    async def rejoin(self, replica: Replica, dead_pid: int | None) -> None:
        """Wait for Ray to restart the replica, reconnect, and give it the pins back."""
        if not await self.replicas.reconnect(replica, dead_pid):
            return
        await self.attach(replica)
        self.pins.repin(replica)
        logger.info("replica %d is back (pid %s)", replica.replica_id, replica.pid)

    def resume_by_recompute(self, request_id: str, prefer: int | None = None) -> None:
        """Run a request elsewhere as prompt + delivered tokens (failover's way), on `prefer` when it
        can take it. Its old replica must no longer hold it (aborted, detached or dead)."""
        routed = self.ledger.requests[request_id]
        self.replicas[routed.replica_id].request_ids.discard(request_id)
        resumed = resumed_request(routed)
        try:
            if resumed is None:
                raise NoReplicaAvailable("it cannot be resumed on another replica (structured output)")
            if prefer is not None and self.replicas[prefer].routable:
                target = self.replicas[prefer]
            else:
                target = self.ledger.route(resumed)
        except NoReplicaAvailable as exc:
            self.ledger.requests.pop(request_id, None)
            self.num_lost += 1
            self.deliver(CoreUpdate([], None, {}, [], lost={request_id: f"the request could not be moved: {exc}"}))
            return
        routed.started = False
        self.ledger.send_to(target, resumed)
        self.num_resumed += 1
