"""A sliding window of a model's layers (TPI-LLM): at most `size` layers resident at once, the next
ones read on a background thread while the current one computes.

Every forward pass walks layers 0..L-1, so the loader cycles: once layer i's weights are dropped
(its LayerWeights object is freed, seen by a weakref finalizer), the slot goes to layer i + size
(mod L), which the next pass reaches first. The window holds the layer computing and the size - 1
after it, so it needs size >= 2: with one slot, the loader would wait for the layer the caller
still holds while the caller waits for the next one.
"""
from __future__ import annotations

import atexit
import gc
import logging
import threading
import weakref
from typing import Callable, Iterator

logger = logging.getLogger(__name__)


class WeightWindow:
    """Iterated like the list of layers (`for layer in model.layers`), one pass at a time.

    Invariant: `resident` (layers loading or loaded and not yet freed) never exceeds `size`;
    `max_resident` is the most it has been, for tests and the start-up log.
    """

    def __init__(self, num_layers: int, size: int, load: Callable[[int], object]):
        if not 2 <= size <= num_layers:
            raise ValueError(f"a weight window holds 2 to {num_layers} layers, got {size}")
        self.num_layers = num_layers
        self.size = size
        self._load = load
        self._cond = threading.Condition()
        self._ready: dict[int, object] = {}  # loaded, not yet handed out
        self._next_load = 0  # the layer the loader reads next
        self._pass_start = 0  # bumped when a pass stops half way: the loader restarts at layer 0
        self._error: BaseException | None = None
        self._closed = False
        self._loader_waits = False  # the loader waits for a slot
        self.resident = 0
        self.max_resident = 0
        self.loads = 0  # layers read so far (the number of passes times L, after the first few)
        self._thread = threading.Thread(target=self._loader, name="weight-window", daemon=True)
        self._thread.start()
        # Stopped before the interpreter's teardown: a daemon thread frozen inside torch aborts the process.
        atexit.register(self.close)

    def __len__(self) -> int:
        return self.num_layers

    def _freed(self) -> None:
        with self._cond:
            self.resident -= 1
            self._cond.notify_all()

    def _loader(self) -> None:
        while True:
            with self._cond:
                self._loader_waits = True
                self._cond.wait_for(lambda: self._closed or self.resident < self.size)
                self._loader_waits = False
                if self._closed:
                    return
                index, epoch = self._next_load, self._pass_start
                self._next_load = (index + 1) % self.num_layers
                self.resident += 1
                self.max_resident = max(self.max_resident, self.resident)
            try:
                layer = self._load(index)
            except BaseException as error:  # surfaced to the pass that waits for this layer
                logger.exception("weight window: reading layer %d failed", index)
                with self._cond:
                    self.resident -= 1
                    self._error = error
                    self._cond.notify_all()
                return
            weakref.finalize(layer, self._freed)
            with self._cond:
                self.loads += 1
                if epoch == self._pass_start and not self._closed:  # else a pass was cut short: dropped
                    self._ready[index] = layer
                self._cond.notify_all()
            del layer

    def _stalled(self, index: int) -> bool:
        return index not in self._ready and self._loader_waits and self.resident >= self.size

    def _take(self, index: int) -> object:
        with self._cond:
            done = lambda: index in self._ready or self._error is not None or self._closed  # noqa: E731
            self._cond.wait_for(lambda: done() or self._stalled(index))
            if not done():
                # Every slot holds a layer that something still references: a cycle the collector may
                # free, else a caller that keeps earlier layers (a bug: it would hang here).
                self._cond.release()
                try:
                    gc.collect()
                finally:
                    self._cond.acquire()
                if self._stalled(index):
                    raise RuntimeError(f"weight window: layer {index} cannot load: all {self.size} slots hold "
                                       "layers that are still referenced")
                self._cond.wait_for(done)
            if index in self._ready:
                return self._ready.pop(index)
            if self._error is not None:
                raise RuntimeError(f"weight window: reading layer {index} failed: {self._error}") from self._error
            raise RuntimeError("weight window is closed")

    def __iter__(self) -> Iterator[object]:
        finished = False
        try:
            for index in range(self.num_layers):
                # No local name holds the layer across the yield: once the caller moves on, it is freed.
                yield self._take(index)
            finished = True
        finally:
            if not finished:
                self._restart()

    def _restart(self) -> None:
        """A pass stopped before its last layer (an error in the step): the next one starts at 0."""
        with self._cond:
            self._pass_start += 1
            self._next_load = 0
            dropped = list(self._ready.values())
            self._ready.clear()
            self._cond.notify_all()
        del dropped  # freed outside the lock: their finalizers take it

    def close(self) -> None:
        """Stop the loader (after the layer it reads) and drop what is loaded."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        atexit.unregister(self.close)
