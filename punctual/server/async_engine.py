"""The server's engine: tokenizer and output processor in the front end, the core in its own process.

Core updates arrive on the asyncio loop; the output processor turns them into text and each
changed request's waiter is woken. A waiter is an asyncio.Event per HTTP request rather than a
queue of deltas: a stream that falls behind reads everything new at once when it wakes, so a
slow client costs one wake-up per step, not one per token.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from punctual.config import ClusterConfig, EngineConfig
from punctual.engine.client import CoreInfo, CoreUpdate, EngineCoreClient, EngineDeadError
from punctual.engine.messages import PinAck
from punctual.engine.protocol import EngineClient
from punctual.engine.tasks import TaskFailures
from punctual.engine.stats import EngineStats
from punctual.engine.output_processor import OutputProcessor, ParentState
from punctual.checkpoints.generation_config import generation_defaults
from punctual.lora.request import LoRARequest
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.server.metrics import ServerMetrics
from punctual.tokenizer import load_tokenizer
from punctual.validation import PromptLimits

logger = logging.getLogger("punctual.server")


class RequestRejected(ValueError):
    """The core refused the request (e.g. its prompt does not fit the KV pool)."""


@dataclass
class RequestHandle:
    """One prompt's generation (n samples) as the server sees it."""

    request_id: str
    state: ParentState
    waiter: asyncio.Event  # shared by every prompt of one HTTP request
    child_ids: list[str]
    error: Exception | None = None
    # The engine's own TTFT runs from the hand-off to the core (its socket) to the step that
    # sampled the first token (the core's clock; monotonic time is system-wide on Linux). Time
    # a request waits in the socket for the running step to end is engine time: the core is busy.
    handed_off_time: float | None = None
    core_first_token_time: float | None = None
    last_token_time: dict[str, float] = field(default_factory=dict)  # per child, for ITL
    tenant: str | None = None  # the API key's tenant, for per-tenant metrics

    @property
    def finished(self) -> bool:
        return self.error is not None or self.state.finished

    @property
    def engine_ttft(self) -> float | None:
        if self.handed_off_time is None or self.core_first_token_time is None:
            return None
        return self.core_first_token_time - self.handed_off_time

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.waiter.set()


class AsyncEngine:
    def __init__(self, config: EngineConfig, metrics: ServerMetrics | None = None,
                 cluster: ClusterConfig | None = None):
        # Several replicas: one client over all of them, with the same surface (cluster/client.py).
        self.cluster = cluster if cluster is not None and cluster.replicas > 1 else None
        self.client: EngineClient
        if self.cluster is not None:
            from punctual.cluster.client import ClusterClient  # imports Ray only when asked

            self.client = ClusterClient(config, self.cluster)
        else:
            self.client = EngineCoreClient(config)
        self.metrics = metrics
        self.info: CoreInfo | None = None
        self.tokenizer = None
        self.generation_defaults: dict = {}  # the checkpoint's sampling defaults (generation_config.json)
        # Pins and unpins waiting for the core's answer, in the order they were sent.
        self._pin_waiters: list[asyncio.Future] = []
        self.lora_enabled = config.lora.enable_lora
        self.sparse_attention = config.model.sparse_attention  # None: dense only
        # LoRA adapters a request may name as its model: name -> request; each load gets a new id,
        # so a name loaded again from another path never meets the old one's cached KV.
        self.loras: dict[str, LoRARequest] = {}
        self._next_lora_id = 1
        self.output_processor: OutputProcessor | None = None
        self.handles: dict[str, RequestHandle] = {}  # parent request id -> handle
        self.by_child: dict[str, RequestHandle] = {}  # core request id -> its parent's handle

    async def start(self, timeout: float | None = None) -> None:
        self.info = await asyncio.to_thread(self.client.start, timeout)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.info.model_path)
        self.generation_defaults = generation_defaults(self.info.model_path)
        if self.generation_defaults:
            logger.info("sampling defaults from the checkpoint's generation_config.json: %s",
                        self.generation_defaults)
        self.output_processor = OutputProcessor(self.tokenizer)
        await self.client.attach(self._on_update, self._on_death)

    # ---- state the routes read ----------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.client.is_alive

    @property
    def dead_reason(self) -> str | None:
        return self.client.dead_reason

    @property
    def core_pid(self) -> int | None:
        return self.client.pid

    @property
    def degraded(self) -> bool:
        """A cluster with a replica down (it still serves while one lives)."""
        return self.cluster is not None and self.client.degraded

    @property
    def background_failures(self) -> TaskFailures:
        """The client's background tasks that failed (GET /health, /metrics)."""
        return self.client.background_failures

    @property
    def replica_stats(self) -> dict[str, EngineStats] | None:
        """Each replica's latest report, by replica id; None for a single engine."""
        return self.client.replica_stats if self.cluster is not None else None

    def replica_info(self) -> list[dict]:
        """GET /admin/replicas: one item per replica (a single engine is replica 0)."""
        if self.cluster is not None:
            return self.client.replica_info()
        stats = self.stats
        return [{"id": 0, "pid": self.core_pid, "node": "127.0.0.1",
                 "state": "ready" if self.is_alive else "dead",
                 "running": stats.num_running if stats else 0, "waiting": stats.num_waiting if stats else 0,
                 "kv_blocks_used": stats.kv_blocks_used if stats else 0,
                 "kv_blocks_total": stats.kv_blocks_total if stats else 0}]

    def migrations(self) -> list[dict]:
        """GET /admin/migrations: the latest migration attempts (drain, rebalance, P/D), oldest first."""
        return list(self.client.migrations) if self.cluster is not None else []

    async def drain_replica(self, replica_id: int) -> dict:
        """POST /admin/replicas/{id}/drain: stop routing to it and move its requests elsewhere."""
        if self.cluster is None:
            raise ValueError("draining needs a cluster of replicas (--replicas 2 or more)")
        return await self.client.drain(replica_id)

    @property
    def prompt_limits(self) -> PromptLimits:
        info = self.info
        if info.streaming:  # attention sinks: no context limit (the core's scheduler says the same)
            return PromptLimits(info.vocab_size, None, None)
        return PromptLimits(info.vocab_size, info.max_model_len, info.max_request_tokens)

    @property
    def num_in_flight(self) -> int:
        """Core requests queued or running, as the front end counts them (no round trip)."""
        return len(self.by_child)

    @property
    def stats(self) -> EngineStats | None:
        """The core's latest report (it sends one whenever its numbers change)."""
        return self.client.stats

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, waiter: asyncio.Event, *, arrival_time: float, priority: int = 0,
                    ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None,
                    user: str | None = None, cache_salt: str | None = None,
                    tenant: str | None = None, lora_request: LoRARequest | None = None) -> RequestHandle:
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine core is not running")
        children = self.output_processor.add_request(request_id, prompt, prompt_token_ids, params,
                                                      arrival_time)
        handle = RequestHandle(request_id, self.output_processor.parents[request_id], waiter,
                               [child_id for child_id, _ in children], tenant=tenant)
        self.handles[request_id] = handle
        for child_id, _ in children:
            self.by_child[child_id] = handle
        try:
            for child_id, child_params in children:
                self.client.add_request(EngineCoreRequest(child_id, prompt_token_ids, child_params, arrival_time,
                                                          priority, ttft_slo_ms, tpot_slo_ms, user, cache_salt,
                                                          tenant, lora_request))
        except EngineDeadError:
            self._forget(handle)
            raise
        handle.handed_off_time = time.monotonic()
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt_token_ids) * params.n)
            if tenant is not None:
                self.metrics.observe_tenant_admitted(tenant, len(prompt_token_ids) * params.n)
        return handle

    # ---- pinned prefixes ----------------------------------------------------------------
    async def pin(self, pin_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> PinAck:
        """Ask the core to compute the prefix and hold its blocks; its answer says whether it took
        the pin (the prefill then runs within a few steps) or why not."""
        return await self._ask_core(self.client.pin_prefix, pin_id, list(prompt_token_ids), cache_salt)

    async def unpin(self, pin_id: str) -> PinAck:
        """Release a pin (cancelling its prefill if it is still running)."""
        return await self._ask_core(self.client.unpin_prefix, pin_id)

    # ---- LoRA adapters ------------------------------------------------------------------
    async def load_lora(self, lora_name: str, lora_path: str) -> PinAck:
        """Load an adapter under `lora_name` (read and checked by the core now, so a bad one is a
        400 here rather than on its first request). Refused: the answer says why, with a status."""
        if not self.lora_enabled:
            return PinAck(lora_name, False, 400, "LoRA is not enabled on this server (start it with --enable-lora)")
        if lora_name in self.loras:
            return PinAck(lora_name, False, 400, f"the LoRA adapter {lora_name!r} is already loaded")
        try:
            lora = LoRARequest(lora_name, self._next_lora_id, lora_path)
        except ValueError as exc:
            return PinAck(lora_name, False, 400, str(exc))
        self._next_lora_id += 1
        ack = await self._ask_core(self.client.load_lora, lora)  # a cluster asks every replica
        if not ack.ok:
            # Replicas that accepted it forget it again; nothing else they hold is touched.
            await self._ask_core(self.client.unload_lora, lora.lora_int_id)
            return ack
        self.loras[lora_name] = lora
        return PinAck(lora_name, True)

    async def unload_lora(self, lora_name: str) -> PinAck:
        """New requests can no longer name it; requests already running under it finish."""
        lora = self.loras.pop(lora_name, None)
        if lora is None:
            return PinAck(lora_name, False, 404, f"the LoRA adapter {lora_name!r} cannot be found")
        await self._ask_core(self.client.unload_lora, lora.lora_int_id)
        return PinAck(lora_name, True)

    async def _ask_core(self, send, *args) -> PinAck:
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine core is not running")
        waiter = asyncio.get_running_loop().create_future()
        self._pin_waiters.append(waiter)
        send(*args)
        return await waiter

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request that is still running (client gone, shutdown); no-op once finished."""
        if handle.request_id not in self.handles:
            return
        core_ids = self.output_processor.abort(handle.request_id)
        self._forget(handle)
        if self.metrics is not None and core_ids:
            self.metrics.requests_finished.labels("abort").inc(len(core_ids))
        if core_ids and self.is_alive:
            try:
                self.client.abort_requests(core_ids)
            except EngineDeadError:
                pass  # the dead core holds no blocks worth freeing

    def _forget(self, handle: RequestHandle) -> None:
        self.handles.pop(handle.request_id, None)
        for child_id in handle.child_ids:
            self.by_child.pop(child_id, None)

    # ---- core updates (on the loop) -----------------------------------------------------
    def _on_update(self, update: CoreUpdate) -> None:
        now = time.monotonic()
        for ack in update.pin_acks:  # the core answers pins and unpins in the order they were sent
            waiter = self._pin_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(ack)
        for child_id, why in update.rejected.items():
            handle = self.by_child.get(child_id)
            if handle is not None:
                self.abort(handle)
                handle.fail(RequestRejected(why))
        for child_id, why in update.lost.items():  # a cluster could not resume it after a replica died
            handle = self.by_child.get(child_id)
            if handle is not None:
                self.abort(handle)
                handle.fail(EngineDeadError(why))
        for output in update.outputs:
            handle = self.by_child.get(output.request_id)
            if handle is None:
                continue
            if self.metrics is not None and output.metrics is not None:
                self.metrics.observe_core_metrics(output.metrics)
            if not output.new_token_ids:
                continue  # e.g. turned away by the scheduler before its first token
            if handle.core_first_token_time is None and self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - handle.state.metrics.arrival_time)
            if output.first_token_time is not None and (
                    handle.core_first_token_time is None or output.first_token_time < handle.core_first_token_time):
                handle.core_first_token_time = output.first_token_time
            if self.metrics is not None:
                # One observation per delivery: the wait a reader sees (several tokens may come at once).
                last = handle.last_token_time.get(output.request_id)
                if last is not None:
                    self.metrics.inter_token_latency.observe(now - last)
                self.metrics.generation_tokens.inc(len(output.new_token_ids))
            handle.last_token_time[output.request_id] = now
        changed, to_abort = self.output_processor.process(update.outputs)
        if to_abort:
            self.client.abort_requests(to_abort)  # stop strings end these in the front end
        for parent in changed:
            handle = self.handles.get(parent.request_id)
            if handle is None:
                continue
            if parent.finished:
                self._forget(handle)
                if self.metrics is not None:
                    self.metrics.observe_finished(parent, handle.tenant)
            handle.waiter.set()

    def _on_death(self, reason: str) -> None:
        logger.error("%s; failing %d in-flight requests", reason, len(self.handles))
        error = EngineDeadError(reason)
        for waiter in self._pin_waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._pin_waiters.clear()
        for handle in list(self.handles.values()):
            self.output_processor.abort(handle.request_id)
            self._forget(handle)
            handle.fail(error)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Fail whatever is still waiting, then stop the core process."""
        for handle in list(self.handles.values()):
            self.abort(handle)
            handle.fail(EngineDeadError("the server is shutting down"))
        await self.client.shutdown(timeout)
