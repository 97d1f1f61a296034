"""Replicas in this process, without Ray: RayReplicas' surface over ReplicaServer threads. For
tests and benchmarks of the cluster client (migration, drain) on one machine; not for serving
(the replicas share this process's GIL and torch threads)."""
from __future__ import annotations

from punctual.cluster.replica import ReplicaServer
from punctual.config import ClusterConfig, EngineConfig
from punctual.wire.auth import new_secret


class InProcessReplicas:
    servers: list[ReplicaServer] = []  # the latest started, for a test to inspect

    def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig):
        self.engine_config, self.cluster = engine_config, cluster
        self.secret = new_secret()

    def start(self) -> None:
        InProcessReplicas.servers = [
            ReplicaServer(self.engine_config, self.cluster.threads_per_replica, "127.0.0.1", self.secret)
            for _ in range(self.cluster.replicas)]

    def address(self, replica_id: int, timeout: float | None = None, not_pid: int | None = None):
        return self.servers[replica_id].address()

    @staticmethod
    def restore_signal_handlers() -> None:
        pass

    def shutdown(self) -> None:
        for server in self.servers:
            server.listener.close()
