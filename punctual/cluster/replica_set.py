"""The replicas' lifecycle as the front end sees it: start them, connect to each, watch one come
back after Ray restarted it, and shut them all down. Which requests each holds is ledger.py's."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Callable

from punctual.cluster.state import Replica
from punctual.config import ClusterConfig, EngineConfig
from punctual.engine.client import CoreInfo, CoreUpdate, EngineCoreClient

logger = logging.getLogger(__name__)


class ReplicaSet:
    def __init__(self, config: EngineConfig, cluster: ClusterConfig):
        from punctual.cluster import launch  # read at call time: tests put in-process replicas there

        self.config = config
        self.cluster = cluster
        self.launcher = launch.RayReplicas(config, cluster)
        self.replicas = [Replica(i) for i in range(cluster.replicas)]
        self.disaggregated = cluster.prefill_replicas > 0
        if self.disaggregated:
            for r in self.replicas:
                r.role = "prefill" if r.replica_id < cluster.prefill_replicas else "decode"
        self.info: CoreInfo | None = None
        self.closing = False

    def __getitem__(self, replica_id: int) -> Replica:
        return self.replicas[replica_id]

    def __iter__(self):
        return iter(self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.ready]

    def start(self, timeout: float | None = None) -> CoreInfo:
        """Start the replicas (blocking) and connect to each; the first one's CoreInfo stands for all,
        with the tightest request limit. On a failure, stops whatever was started."""
        self.launcher.start()
        try:
            infos = [self.connect(r, timeout) for r in self.replicas]
        except BaseException:
            self.launcher.shutdown()
            raise
        self.info = dataclasses.replace(infos[0], max_request_tokens=min(i.max_request_tokens for i in infos))
        return self.info

    def connect(self, replica: Replica, timeout: float | None, not_pid: int | None = None) -> CoreInfo:
        """Wait (blocking) for the replica's engine to listen (`not_pid`: not the process that
        died) and connect a new EngineCoreClient to it; sets the replica's client, host and pid."""
        host, port, pid = self.launcher.address(replica.replica_id, timeout, not_pid)
        client = EngineCoreClient(self.config)
        info = client.connect(host, port, timeout=30.0, secret=self.launcher.secret)
        replica.client, replica.host, replica.pid = client, host, pid
        return info

    async def attach(self, replica: Replica, on_update: Callable[[int, CoreUpdate], None],
                     on_death: Callable[[int, str], None]) -> None:
        """Deliver the replica's updates and its death (with its id) on the loop; it is ready then."""
        rid = replica.replica_id
        await replica.client.attach(lambda update: on_update(rid, update), lambda reason: on_death(rid, reason))
        replica.state = "ready"

    async def reconnect(self, replica: Replica, dead_pid: int | None) -> bool:
        """Wait for Ray to restart the replica and connect to it. False when it will not come back
        (out of restarts) or the cluster is shutting down; its state says which."""
        try:
            await asyncio.to_thread(self.connect, replica, self.cluster.start_timeout_s, dead_pid)
        except Exception as exc:  # out of restarts, or shut down meanwhile
            if not self.closing:
                logger.error("replica %d will not come back: %s", replica.replica_id, exc)
            replica.state = "dead" if not self.closing else "stopped"
            return False
        return not self.closing

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Tell every replica to abort its requests, mark them stopped."""
        self.closing = True
        await asyncio.gather(*(r.client.shutdown(timeout) for r in self.replicas if r.client is not None))
        for replica in self.replicas:
            replica.state = "stopped"

    async def stop_actors(self) -> None:
        """Kill the actors and stop Ray if it is ours."""
        await asyncio.to_thread(self.launcher.shutdown)
