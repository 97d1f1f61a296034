"""LoRA adapters read from disk on a background thread, while the requests that need them wait
here and the step loop keeps serving everyone else (S-LoRA's point: a cold adapter costs its own
requests a read, not every running stream a stalled step).

Only the read (safetensors, the checks, the per-slot tensors) runs on the thread; the adapter
joins the runner's loaded set on the core's thread, when `take` hands it over, so the set is never
touched by two threads. The server's core process uses this; an offline `LLM` reads inline, where
the caller expects a bad adapter to raise at once.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Generic, TypeVar

from punctual.engine.messages import PinAck
from punctual.lora.request import LoRARequest

Adapter = TypeVar("Adapter")


class AdapterLoads(Generic[Adapter]):
    """Reads in flight, one per adapter, and what waits on each: requests (request id -> item)
    and load commands (answered with a PinAck when the read ends)."""

    def __init__(self, read: Callable[[LoRARequest], Adapter], keep: Callable[[LoRARequest, Adapter], object]):
        self._read = read
        self._keep = keep
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-read")
        self._reads: dict[int, tuple[LoRARequest, concurrent.futures.Future]] = {}  # by lora_int_id
        self._requests: dict[str, tuple[int, object]] = {}  # request id -> (lora_int_id, item)
        self._commands: list[LoRARequest] = []  # load commands waiting for their read

    def __len__(self) -> int:
        return len(self._requests) + len(self._commands)

    def _submit(self, lora_request: LoRARequest) -> None:
        inflight = self._reads.get(lora_request.lora_int_id)
        if inflight is not None:
            if inflight[0].lora_path != lora_request.lora_path:
                raise ValueError(f"lora_int_id {lora_request.lora_int_id} is being loaded from "
                                 f"{inflight[0].lora_path!r}, not {lora_request.lora_path!r}: give each "
                                 "adapter its own lora_int_id")
            return
        self._reads[lora_request.lora_int_id] = (lora_request, self._executor.submit(self._read, lora_request))

    def add_request(self, request_id: str, lora_request: LoRARequest, item: object) -> None:
        """Hold a request until its adapter is read; ValueError if it clashes with a read in flight."""
        self._submit(lora_request)
        self._requests[request_id] = (lora_request.lora_int_id, item)

    def add_command(self, lora_request: LoRARequest) -> None:
        self._submit(lora_request)
        self._commands.append(lora_request)

    def discard(self, request_ids: list[str]) -> list[object]:
        """Forget aborted requests (their read goes on: the adapter is kept for the next one)."""
        return [entry[1] for rid in request_ids if (entry := self._requests.pop(rid, None)) is not None]

    def take(self) -> tuple[list[object], list[tuple[str, str]], list[PinAck]]:
        """(items whose adapter is now loaded, [(request id, why its adapter failed)], answers to
        the load commands whose read ended)."""
        errors: dict[int, str] = {}
        for lora_int_id, (lora_request, future) in list(self._reads.items()):
            if not future.done():
                continue
            del self._reads[lora_int_id]
            try:
                self._keep(lora_request, future.result())
            except (ValueError, OSError) as exc:  # a bad adapter: its waiting requests' 400
                errors[lora_int_id] = str(exc)
        ready, failed = [], []
        for request_id, (lora_int_id, item) in list(self._requests.items()):
            if lora_int_id in self._reads:
                continue
            del self._requests[request_id]
            if lora_int_id in errors:
                failed.append((request_id, errors[lora_int_id]))
            else:
                ready.append(item)
        acks, still_waiting = [], []
        for lora_request in self._commands:
            if lora_request.lora_int_id in self._reads:
                still_waiting.append(lora_request)
            elif lora_request.lora_int_id in errors:
                acks.append(PinAck(lora_request.lora_name, False, 400, errors[lora_request.lora_int_id]))
            else:
                acks.append(PinAck(lora_request.lora_name, True))
        self._commands = still_waiting
        return ready, failed, acks

    def wait(self, timeout_s: float) -> None:
        """Block until a read ends or timeout_s passes: the core has nothing else to do."""
        futures = [future for _, future in self._reads.values()]
        if futures:
            concurrent.futures.wait(futures, timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
