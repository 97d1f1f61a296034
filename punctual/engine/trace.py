"""A serving core's own record of its steps and requests, for `punctual sim calibrate --server`
and `punctual sim validate --server-trace` (sim/trace.py reads it back).

With `PUNCTUAL_STEP_TRACE=FILE` in its environment, the core process of `punctual serve` writes
one JSON line per step (the plan's features, when it was planned, when its outputs were sent,
which requests got their first token, which sampled one) and per request taken in (the front
end's arrival stamp and the time the core received it). The step's cost as the simulator must charge it is the
serving loop's period, from one plan to the next (scheduling, the model, the update, sending the
outputs and taking in new requests, on cores the front end shares), not the model call alone.

Pure Python; the core imports it only when the variable is set. It lives with the engine that
writes it; the simulator, above, imports it from here.
"""
from __future__ import annotations

import json
import os
import time

from punctual.plan import plan_features

TRACE_ENV = "PUNCTUAL_STEP_TRACE"
FLUSH_EVERY = 256  # lines buffered between writes: the trace must not cost the loop it measures


class StepTrace:
    """Written by the core loop: wraps the scheduler to see each plan; buffered JSON lines."""

    def __init__(self, path: str, scheduler):
        self.file = open(path, "a", buffering=1 << 16)
        self.lines: list[str] = []
        self.plan = None
        self.planned = 0.0
        schedule = scheduler.schedule

        def traced(now, *args, **kwargs):
            self.planned = time.monotonic()
            self.plan = plan = schedule(now, *args, **kwargs)
            return plan
        scheduler.schedule = traced

    @classmethod
    def from_env(cls, scheduler) -> "StepTrace | None":
        path = os.environ.get(TRACE_ENV)
        return cls(path, scheduler) if path else None

    def added(self, request_id: str, arrival_time: float, prompt_tokens: int | None = None,
              max_tokens: int | None = None) -> None:
        """A request taken in; its lengths let a reader match it to the client's record."""
        self._write({"add": request_id, "arrival": arrival_time, "received": time.monotonic(),
                     "prompt_tokens": prompt_tokens, "max_tokens": max_tokens})

    def stepped(self, idle_before: bool, outputs) -> None:
        """After a loop iteration's outputs were sent. `idle_before`: the loop blocked for work first."""
        plan, self.plan = self.plan, None
        if plan is None or not plan.scheduled:
            return
        first = [o.request_id for o in outputs if o.first_token_time is not None]
        # Who sampled a token in it: a reader follows each request's decode steps (how many, of
        # which kind) to compare with the simulator's (`punctual.sim.diagnose`).
        sampled = [item.request_id for item in plan.scheduled if item.samples]
        self._write({"step": plan_features(plan), "planned": self.planned, "sent": time.monotonic(),
                     "idle_before": idle_before, "first": first, "sampled": sampled})

    def _write(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if len(self.lines) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.file.write("\n".join(self.lines) + "\n")
            self.file.flush()
            self.lines = []

    def close(self) -> None:
        self.flush()
        self.file.close()


def replica_trace_path(path: str, replica_id: int) -> str:
    """Where replica `replica_id` of a cluster writes its trace when the front end was given `path`
    (each replica's core is a process of its own: one file each, or their lines would interleave)."""
    return f"{path}.replica{replica_id}"


def trace_paths(path: str) -> list[str]:
    """The files a server traced to `path`: the file itself (one engine core) and, for a cluster,
    each replica's, in replica order."""
    import glob
    import re

    found = [path] if os.path.exists(path) else []
    replicas = glob.glob(glob.escape(path) + ".replica*")
    number = re.compile(r"\.replica(\d+)$")
    found += sorted((p for p in replicas if number.search(p)), key=lambda p: int(number.search(p).group(1)))
    return found
