"""The front end's handle on an engine, whatever runs it: one core in its own process
(engine/client.py's EngineCoreClient) or a cluster of replicas (cluster/client.py's
ClusterClient). AsyncEngine (server/async_engine.py) talks to either through this surface only.

Threading: start() blocks and is called off the loop (asyncio.to_thread); every other method is
called on the asyncio loop that attach() ran on, and the callbacks are invoked on it too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from punctual.engine.stats import EngineStats
    from punctual.engine.tasks import TaskFailures
    from punctual.engine.messages import CoreInfo, CoreUpdate
    from punctual.request import EngineCoreRequest


@runtime_checkable
class EngineClient(Protocol):
    @property
    def pid(self) -> int | None:
        """The engine core's process id (a cluster: a live replica's); None before start or when none runs."""

    @property
    def is_alive(self) -> bool:
        """The engine can take requests: started, and not dead (a cluster: any replica ready)."""

    @property
    def dead_reason(self) -> str | None:
        """Why the engine cannot take requests, once it cannot; None while it can."""

    @property
    def stats(self) -> EngineStats | None:
        """The latest counters and gauges the core reported (a cluster: summed over replicas).
        Reads a cached report: no round trip, no side effect."""

    @property
    def background_failures(self) -> TaskFailures:
        """The client's background tasks that ended with an exception: counts per kind of task
        and the latest few (each logged with its traceback when it failed); empty while all is
        well. The same object all along (it grows); reading it changes nothing."""

    def start(self, timeout: float | None = None) -> CoreInfo:
        """Start the engine (spawn its process, or launch and connect to every replica) and block
        until its model is loaded. Raises RuntimeError if it fails or takes over `timeout` s, after
        stopping whatever it started."""

    async def attach(self, on_update: Callable[[CoreUpdate], None], on_death: Callable[[str], None]) -> None:
        """Start delivering the engine's updates to `on_update` on the running loop. `on_death` is
        called once, with the reason, when the engine can no longer serve (a cluster calls it never:
        it lives while any replica does, and ends the lost requests through `CoreUpdate.lost`)."""

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue the request for the core (sent at the end of this loop iteration). Raises
        EngineDeadError when the engine is dead. Its outputs and its refusal, if refused, come
        back through `on_update`."""

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop these requests and free their KV; unknown or finished ids are ignored. No update
        reports the abort."""

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int]) -> None:
        """Ask the core (a cluster: every ready replica) to compute the prefix and hold its blocks.
        The answer comes back, in order with other pins and unpins, as a PinAck in an update.
        Raises EngineDeadError when nothing runs to answer."""

    def unpin_prefix(self, pin_id: str) -> None:
        """Release a pin (its blocks become evictable); answered like pin_prefix."""

    def load_lora(self, lora_request) -> None:
        """Read and check a LoRA adapter (a cluster: on every ready replica); answered like
        pin_prefix, a refusal naming the problem (and the replica)."""

    def unload_lora(self, lora_int_id: int) -> None:
        """Forget an adapter's weights where no request runs under it; answered like pin_prefix."""

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Abort every request and stop the engine (its processes or replicas), killing what has
        not exited within `timeout` s. No update is delivered after it returns."""
