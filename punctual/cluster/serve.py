"""Ray Serve entry point: the same FastAPI app (routes, auth, streaming, replicas) as a Serve application.

    from ray import serve
    from punctual.cluster.serve import build_app
    serve.run(build_app("smollm2", replicas=2, threads_per_replica=4))

The app is built inside the Serve replica (a builder function), so its engine replicas are Ray
actors of the same cluster, started when Serve starts the deployment and stopped with it. One
Serve replica is one front end with its own engine replicas; scale engines with `replicas`.
"""
from __future__ import annotations


def build_app(model: str = "builtin", *, replicas: int = 2, threads_per_replica: int = 1,
              gpus_per_replica: float = 0, router: str = "cache_aware", api_key: str | None = None,
              served_model_name: str | None = None, prefill_replicas: int = 0, decode_replicas: int = 0,
              migration: bool = False, kv_transport: str = "object-store", **engine_options):
    """A Ray Serve Application serving `model` on `replicas` engine replicas.
    `engine_options` are EngineConfig keywords (kv_cache_memory, max_num_seqs, ...).
    `prefill_replicas` and `decode_replicas` (both or neither) replace `replicas`."""
    from ray import serve

    from punctual.config import ClusterConfig, EngineConfig
    from punctual.server.config import ServerConfig

    engine_config = EngineConfig.from_kwargs(model, **engine_options)
    if prefill_replicas or decode_replicas:
        replicas = prefill_replicas + decode_replicas
    cluster = ClusterConfig(replicas=replicas, threads_per_replica=threads_per_replica,
                            num_gpus_per_replica=gpus_per_replica, router=router, ray_address="auto",
                            prefill_replicas=prefill_replicas, decode_replicas=decode_replicas, migration=migration,
                            kv_transport=kv_transport)
    cluster.validate()
    server_config = ServerConfig(served_model_name=served_model_name or model, api_key=api_key)

    def make_fastapi_app():
        from punctual.server.app import build_app as build_fastapi_app

        return build_fastapi_app(engine_config, server_config, cluster)

    @serve.deployment(name="punctual", num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(make_fastapi_app)
    class PunctualFrontEnd:
        """The OpenAI front end; its engine replicas are separate actors."""

    return PunctualFrontEnd.bind()
