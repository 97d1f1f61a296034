"""Ray: start or join a cluster, place one ReplicaServer actor per replica, and stop them.

Everything that imports Ray lives here; the cluster client only calls these blocking methods
(from threads, off the asyncio loop).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import uuid

from punctual.config import ClusterConfig, EngineConfig
from punctual.engine.trace import TRACE_ENV, replica_trace_path
from punctual.wire.auth import new_secret

logger = logging.getLogger(__name__)

# A local Ray's object store: replicas pass no tensors through it, only small method results,
# unless moved KV travels through it (--kv-transport object-store: a few requests' KV at once).
LOCAL_OBJECT_STORE_BYTES = 80 << 20
LOCAL_OBJECT_STORE_KV_BYTES = 512 << 20


def use_cluster_token_auth() -> None:
    """Before joining a cluster by address: turn Ray's token authentication on in this process when
    a token is found (~/.ray/auth_token, which `ray start --head` and a local ray.init write, or
    RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE is unset. Ray 2.60 does this itself
    only for address "auto"; with HOST:PORT it connects without the token, and a head started by
    `ray start --head` (token auth on once a token exists) refuses it with InvalidAuthToken."""
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    if maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        logger.info("joining the Ray cluster with token authentication (RAY_AUTH_MODE=token)")


def replica_resources(engine_config: EngineConfig, cluster: ClusterConfig) -> tuple[EngineConfig, int, int]:
    """(the engine config each replica runs, the CPUs its actor reserves, the CPUs a replica takes in
    all). A tensor-parallel replica is a group of tensor_parallel_size ranks of threads_per_rank CPUs
    (default: threads_per_replica): its actor reserves them all when its ranks are its own
    subprocesses; on a cluster joined by address (ray_address) the ranks are Ray actors placed by Ray
    (runner/tp_ray.py): the replica's actor takes bundle 0 of its group's placement group (made
    here, one bundle per rank), its ranks the others."""
    model = engine_config.model
    if model.tensor_parallel_size == 1:
        return engine_config, cluster.threads_per_replica, cluster.threads_per_replica
    threads = model.threads_per_rank or cluster.threads_per_replica
    backend = "ray" if cluster.ray_address is not None else "local"
    config = dataclasses.replace(engine_config, model=dataclasses.replace(
        model, threads_per_rank=threads, tensor_parallel_backend=backend))
    group = threads * model.tensor_parallel_size
    return config, threads if backend == "ray" else group, group


def check_cpus(ray, replicas: int, actor_cpus: int, replica_cpus: int) -> None:
    """Refuse at start-up a cluster whose replicas Ray could never place (they would wait forever)."""
    total = ray.cluster_resources().get("CPU", 0)
    if replicas * replica_cpus > total:
        raise RuntimeError(f"{replicas} replicas of {replica_cpus} CPUs each (tensor_parallel_size x threads_per_rank, "
                           f"or threads_per_replica) need {replicas * replica_cpus} Ray CPUs; the Ray cluster has "
                           f"{total:g}")
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if actor_cpus > largest:
        raise RuntimeError(f"a replica's actor needs {actor_cpus} CPUs on one node (its tensor-parallel ranks run "
                           f"beside it without --ray-address); the largest node has {largest:g}")
    logger.info("replicas: %d x %d Ray CPUs (of %g)", replicas, replica_cpus, total)


class RayReplicas:
    """The replicas' actors; a local Ray instance is started here when no address is given."""

    def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig):
        self.engine_config = engine_config
        self.cluster = cluster
        self.actors: list = []
        self.groups: list = []  # one placement group per replica whose ranks Ray places
        self.name = uuid.uuid4().hex[:8]  # this cluster's, in its placement groups' names
        self.started_ray = False
        # The replicas' wire secret, made here at start-up: it reaches each replica as an argument
        # of its actor's constructor (through Ray, never a command line or an environment).
        self.secret = new_secret()

    def start(self) -> None:
        """Connect to (or start) Ray and create every replica's actor; does not wait for them."""
        import ray

        from punctual.cluster.replica import ReplicaServer

        cluster = self.cluster
        engine_config, actor_cpus, replica_cpus = replica_resources(self.engine_config, cluster)
        if not ray.is_initialized():
            if cluster.ray_address is None:
                # Loopback, no dashboard, a small object store: a laptop or a test, not a service.
                ray.init(num_cpus=cluster.replicas * replica_cpus,
                         num_gpus=int(cluster.replicas * cluster.num_gpus_per_replica) or None,
                         include_dashboard=cluster.ray_dashboard, _node_ip_address=cluster.ray_host,
                         dashboard_host=cluster.ray_host,
                         object_store_memory=LOCAL_OBJECT_STORE_KV_BYTES if cluster.kv_transport == "object-store"
                         else LOCAL_OBJECT_STORE_BYTES,
                         log_to_driver=False, configure_logging=False)
                self.started_ray = True
            else:
                use_cluster_token_auth()
                try:
                    ray.init(address=cluster.ray_address, log_to_driver=False, configure_logging=False)
                except ConnectionError as exc:
                    raise RuntimeError(
                        f"could not join the Ray cluster at {cluster.ray_address}: {exc}. A cluster with token "
                        "authentication (a `ray start --head` that found a token) needs its ~/.ray/auth_token "
                        "on this host too") from exc
        check_cpus(ray, cluster.replicas, actor_cpus, replica_cpus)
        # Replicas on this machine listen on loopback; on a cluster, on their node's address.
        host = cluster.ray_host if self.started_ray else None
        actor_class = ray.remote(ReplicaServer)
        trace = os.environ.get(TRACE_ENV)
        for replica_id in range(cluster.replicas):
            options = dict(num_cpus=actor_cpus, num_gpus=cluster.num_gpus_per_replica,
                           max_restarts=cluster.max_restarts)
            if engine_config.model.tensor_parallel_backend == "ray":
                # The group's bundles live as long as the cluster: a replica that Ray restarts finds
                # its ranks' CPUs again (a group the replica made itself would outlive its process).
                options["scheduling_strategy"] = self._rank_group(engine_config, replica_id)
            if trace:  # `punctual sim calibrate --server --replicas N`: one step trace per replica
                options["runtime_env"] = {"env_vars": {TRACE_ENV: replica_trace_path(trace, replica_id)}}
            # With tensor parallelism rank 0 sets its own threads (threads_per_rank).
            self.actors.append(actor_class.options(**options).remote(
                engine_config, engine_config.model.threads_per_rank or cluster.threads_per_replica, host, self.secret))
        self.ray = ray

    def _rank_group(self, engine_config: EngineConfig, replica_id: int):
        """A PACK placement group of one bundle per rank (threads_per_rank CPUs each) for the replica;
        the scheduling strategy that puts its actor, rank 0, in bundle 0."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from punctual.runner.tp_ray import GROUP_NAME_PREFIX

        model = engine_config.model
        group = placement_group([{"CPU": model.threads_per_rank}] * model.tensor_parallel_size, strategy="PACK",
                                name=f"{GROUP_NAME_PREFIX}{self.name}-{replica_id}")
        self.groups.append(group)
        return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)

    @staticmethod
    def restore_signal_handlers() -> None:
        """ray.init put Ray's C++ failure handler on SIGTERM and SIGINT, over the server's own: it
        aborts the process, so the graceful shutdown (drain, stop replicas, stop Ray) never ran.
        Re-register the Python handlers; only the main thread may."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if handler is not None:
                signal.signal(signum, handler)

    def address(self, replica_id: int, timeout: float | None = None,
                not_pid: int | None = None) -> tuple[str, int, int, str]:
        """(host, port, pid) of a replica once its engine has loaded; waits through a
        restart (`not_pid`: the pid of the process that died). Raises when it is gone for good."""
        ray = self.ray
        actor = self.actors[replica_id]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                host, port, pid = ray.get(actor.address.remote(), timeout=5.0)
                if pid != not_pid:
                    break
            except ray.exceptions.GetTimeoutError:
                pass
            except ray.exceptions.ActorDiedError:
                raise  # out of restarts, or killed by us
            except ray.exceptions.RayActorError:
                pass  # dead and not yet restarted: Ray is on it
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"replica {replica_id} did not come up within {timeout} s")
            time.sleep(0.2)
        return host, port, pid

    def shutdown(self) -> None:
        """Kill every actor (no restart) and stop Ray if it was started here."""
        ray = self.ray if hasattr(self, "ray") else None
        if ray is None:
            return
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception:  # already gone
                pass
        if self.started_ray:
            ray.shutdown()
