"""The FastAPI app: OpenAI routes under /v1, plus /tokenize, /detokenize, /health, /metrics and /version."""
from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from punctual import __version__
from punctual.config import ClusterConfig, EngineConfig
from punctual.server.async_engine import AsyncEngine
from punctual.server.auth import isolation_salt, tenant_of
from punctual.server.chat import ChatServing
from punctual.server.completions import CompletionServing
from punctual.server.config import ServerConfig
from punctual.server.errors import APIError, install_error_handlers
from punctual.server.metrics import ServerMetrics
from punctual.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      LoadLoRAAdapterRequest, PinRequest, TokenizeRequest, UnloadLoRAAdapterRequest,
                                      UnpinRequest)
from punctual.server.structured import GrammarValidator
from punctual.server.tokenize import detokenize, tokenize
from punctual.validation import PromptError, check_prompt

ARRIVAL_KEY = "punctual.arrival_time"


class StampArrival:
    """ASGI middleware: note when a request arrived, before its body is read or parsed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope[ARRIVAL_KEY] = time.monotonic()
        await self.app(scope, receive, send)


def arrival_time(request: Request) -> float:
    return request.scope.get(ARRIVAL_KEY) or time.monotonic()


def build_app(engine_config: EngineConfig, config: ServerConfig, cluster: ClusterConfig | None = None) -> FastAPI:
    """An app that starts the engine core process (or a cluster of replicas) on start-up and
    stops it on shutdown."""
    metrics = ServerMetrics()
    engine = AsyncEngine(engine_config, metrics, cluster)
    grammars = GrammarValidator(engine)  # one compile cache for both routes
    completions = CompletionServing(engine, config, grammars)
    chat = ChatServing(engine, config, grammars)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start(config.engine_start_timeout_s)
        for name, path in config.lora_modules:  # a bad adapter stops the start, naming it
            ack = await engine.load_lora(name, path)
            if not ack.ok:
                await engine.shutdown(config.shutdown_timeout_s)
                raise RuntimeError(f"--lora-modules {name}={path}: {ack.error}")
        metrics.watch_engine(lambda: engine.replica_stats or engine.stats, lambda: engine.is_alive,
                             lambda: engine.background_failures)
        try:
            yield
        finally:
            await engine.shutdown(config.shutdown_timeout_s)

    app = FastAPI(title="Punctual", version=__version__, lifespan=lifespan,
                  description="A latency-first LLM serving engine with an OpenAI-compatible API.")
    app.state.engine = engine
    app.state.metrics = metrics
    started = int(time.time())
    install_error_handlers(app)
    app.add_middleware(StampArrival)

    async def check_api_key(request: Request) -> None:
        """401 without a known key; otherwise the key's tenant goes in request.state.tenant."""
        request.state.tenant = None
        if not config.api_keys:
            return
        tenant = tenant_of(config.api_keys, request.headers.get("authorization", ""))
        if tenant is None:
            raise APIError(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        request.state.tenant = tenant

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request, arrival_time(request))

    @v1.post("/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request, arrival_time(request))

    @v1.get("/models")
    async def list_models() -> dict:
        max_model_len = engine.info.max_model_len if engine.info is not None else None
        base = {"id": config.served_model_name, "object": "model", "created": started, "owned_by": "punctual",
                "root": engine_config.model.model, "parent": None, "max_model_len": max_model_len}
        # Each LoRA adapter is a model of its own, its parent the base model (vLLM's shape).
        adapters = [{**base, "id": name, "root": lora.lora_path, "parent": config.served_model_name}
                    for name, lora in engine.loras.items()]
        return {"object": "list", "data": [base, *adapters]}

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        if body.lora_name == config.served_model_name:
            raise APIError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
        ack = await engine.load_lora(body.lora_name, body.lora_path)
        if not ack.ok:
            raise APIError(ack.status, ack.error, param="lora_path" if "already" not in ack.error else "lora_name")
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        ack = await engine.unload_lora(body.lora_name)
        if not ack.ok:
            raise APIError(ack.status, ack.error, param="lora_name", code="model_not_found")
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    @v1.post("/cache/pin")
    async def pin_prefix(body: PinRequest, request: Request) -> dict:
        if body.model is not None and body.model != config.served_model_name:
            raise APIError(404, f"model {body.model!r} does not exist", param="model", code="model_not_found")
        if (body.prompt is None) == (body.prompt_token_ids is None):
            raise APIError(400, "give exactly one of prompt and prompt_token_ids", param="prompt")
        token_ids = (engine.tokenizer.encode(body.prompt) if body.prompt is not None
                     else list(body.prompt_token_ids))
        param = "prompt" if body.prompt is not None else "prompt_token_ids"
        try:
            check_prompt(token_ids, engine.prompt_limits, param=param)
        except PromptError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        pin_id = body.pin_id or f"pin-{secrets.token_hex(8)}"
        salt = isolation_salt(config.prefix_cache_isolation, request.state.tenant, body.user, body.cache_salt)
        ack = await engine.pin(pin_id, token_ids, salt)
        if not ack.ok:
            raise APIError(ack.status, ack.error, param="pin_id" if ack.status == 409 else param,
                           code="already_pinned" if ack.status == 409 else None)
        return {"object": "cache.pin", "pin_id": pin_id, "num_tokens": ack.num_tokens}

    @v1.post("/cache/unpin")
    async def unpin_prefix(body: UnpinRequest) -> dict:
        ack = await engine.unpin(body.pin_id)
        if not ack.ok:
            raise APIError(ack.status, ack.error, param="pin_id", code="pin_not_found")
        return {"object": "cache.unpin", "pin_id": body.pin_id, "unpinned": True}

    app.include_router(v1)

    def check_model(name: str | None) -> None:  # an adapter shares the base model's tokenizer
        if name is not None and name != config.served_model_name and name not in engine.loras:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{config.served_model_name!r}", "model", "model_not_found")

    # vLLM serves these outside /v1; they need the API key all the same.
    @app.post("/tokenize", dependencies=[Depends(check_api_key)])
    async def tokenize_route(body: TokenizeRequest) -> dict:
        check_model(body.model)
        return tokenize(engine, body)

    @app.post("/detokenize", dependencies=[Depends(check_api_key)])
    async def detokenize_route(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        return detokenize(engine, body)

    @app.get("/health")
    async def health() -> Response:
        # A failed background task (a move, a rejoin) is reported, not turned into a 503: the
        # engine still serves, and a load balancer takes a 503 backend out of rotation, which
        # would make a bug in an optimisation an outage. Alert on the field or on the counter
        # punctual_background_task_failures_total instead.
        failures = engine.background_failures
        background = {"count": failures.count, "latest": [f.as_dict() for f in failures.latest]}
        if engine.is_alive:  # a cluster serves while any replica does
            return JSONResponse({"status": "degraded" if engine.degraded else "ok", "engine_pid": engine.core_pid,
                                 "background_task_failures": background})
        error = APIError(503, f"the engine is not running: {engine.dead_reason or 'not started'}",
                         code="engine_unavailable")
        return JSONResponse({**error.body(), "status": "unavailable", "engine_pid": engine.core_pid,
                             "background_task_failures": background}, status_code=503)

    @app.get("/admin/replicas", dependencies=[Depends(check_api_key)])
    async def list_replicas() -> list[dict]:
        return engine.replica_info()

    @app.post("/admin/replicas/{replica_id}/drain", dependencies=[Depends(check_api_key)])
    async def drain_replica(replica_id: int) -> Response:
        try:
            return JSONResponse(await engine.drain_replica(replica_id))
        except ValueError as exc:
            return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.get("/admin/migrations", dependencies=[Depends(check_api_key)])
    async def list_migrations() -> list[dict]:
        return engine.migrations()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__, "engine_pid": engine.core_pid}

    return app
