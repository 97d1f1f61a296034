"""Background work of an engine client, kept: every task is held until it ends, and one that
fails is logged with its traceback and recorded, for GET /health and the metrics.

asyncio keeps only a weak reference to a task, so a task nobody holds may be collected before it
ends, and its exception surfaces (if ever) as "Task exception was never retrieved".
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Coroutine

logger = logging.getLogger(__name__)

MAX_FAILURES_KEPT = 20  # the latest failures shown; the counts cover them all


@dataclass(frozen=True)
class TaskFailure:
    """A background task that ended with an exception."""

    task: str  # its kind, e.g. "rebalance" or "rejoin"
    error: str  # the exception, as repr
    at: float  # time.time() when it failed

    def as_dict(self) -> dict:
        return {"task": self.task, "error": self.error, "at": self.at}


@dataclass
class TaskFailures:
    by_task: dict[str, int] = field(default_factory=dict)  # failures so far, per kind of task
    latest: list[TaskFailure] = field(default_factory=list)  # the latest MAX_FAILURES_KEPT, oldest first

    @property
    def count(self) -> int:
        return sum(self.by_task.values())


class BackgroundTasks:
    def __init__(self):
        self._tasks: set[asyncio.Task] = set()
        self.failures = TaskFailures()

    def spawn(self, coroutine: Coroutine, kind: str) -> asyncio.Task:
        """Run `coroutine` on the running loop as a task held here until it ends. `kind` names
        it in the log and in the failure record (one name per job, not per request: it labels a
        metric)."""
        task = asyncio.get_running_loop().create_task(coroutine, name=kind)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    @property
    def running(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        kind = task.get_name()
        logger.error("background task %s failed", kind, exc_info=error)
        failures = self.failures
        failures.by_task[kind] = failures.by_task.get(kind, 0) + 1
        failures.latest.append(TaskFailure(kind, repr(error), time.time()))
        del failures.latest[:-MAX_FAILURES_KEPT]

    async def cancel_all(self) -> None:
        """Cancel what still runs (at shutdown) and wait for it to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
