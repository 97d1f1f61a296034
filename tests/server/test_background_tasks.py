"""A background task of the engine client that fails is logged with its traceback, counted, and
shown in GET /health and /metrics; a task is held until it ends (never fire-and-forget)."""
from __future__ import annotations

import asyncio
import gc
import logging

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from punctual.config import EngineConfig
from punctual.engine.tasks import BackgroundTasks, TaskFailures
from punctual.server.app import build_app
from punctual.server.config import ServerConfig
from punctual.server.metrics import EngineStatsCollector


def run_tasks(*coroutines_and_kinds) -> tuple[BackgroundTasks, list[dict]]:
    """Spawn each (coroutine, kind) and wait for all; returns the registry and what reached the
    loop's exception handler ("Task exception was never retrieved" would)."""
    unhandled: list[dict] = []

    async def main() -> BackgroundTasks:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        tasks = BackgroundTasks()
        spawned = [tasks.spawn(coroutine, kind) for coroutine, kind in coroutines_and_kinds]
        assert tasks.running == len(spawned)  # held while they run
        await asyncio.wait(spawned)
        await asyncio.sleep(0)  # done-callbacks run on the next iteration
        del spawned
        gc.collect()  # an unretrieved exception is reported when its task is collected
        return tasks

    tasks = asyncio.run(main())
    return tasks, unhandled


def test_a_failed_task_is_logged_counted_and_released(caplog):
    async def fails():
        raise RuntimeError("the move broke")

    async def succeeds():
        return 1

    with caplog.at_level(logging.ERROR, logger="punctual.engine.tasks"):
        tasks, unhandled = run_tasks((fails(), "rebalance"), (succeeds(), "rebalance"), (fails(), "rejoin"))
    assert tasks.running == 0
    assert tasks.failures.by_task == {"rebalance": 1, "rejoin": 1} and tasks.failures.count == 2
    assert [(f.task, f.error) for f in tasks.failures.latest] == [
        ("rebalance", "RuntimeError('the move broke')"), ("rejoin", "RuntimeError('the move broke')")]
    logged = [r for r in caplog.records if "background task" in r.getMessage()]
    assert [r.getMessage() for r in logged] == ["background task rebalance failed", "background task rejoin failed"]
    assert all(r.exc_info and "the move broke" in str(r.exc_info[1]) for r in logged)  # with its traceback
    assert not unhandled, unhandled


class StubClient:
    """An engine client that serves and has had one background failure."""

    pid = 4242
    is_alive = True
    dead_reason = None
    stats = None

    def __init__(self, failures: TaskFailures):
        self.background_failures = failures


def test_health_and_metrics_show_background_failures():
    async def fails():
        raise ValueError("no such replica")

    tasks, _ = run_tasks((fails(), "to-decode"))
    app = build_app(EngineConfig.from_kwargs("builtin-tiny"), ServerConfig(served_model_name="m"))
    engine = app.state.engine
    engine.client = StubClient(TaskFailures())
    http = TestClient(app)  # no lifespan: nothing starts, the stub stands for the engine
    healthy = http.get("/health")
    assert healthy.status_code == 200
    assert healthy.json()["status"] == "ok" and healthy.json()["background_task_failures"] == {"count": 0,
                                                                                               "latest": []}
    engine.client = StubClient(tasks.failures)
    health = http.get("/health")
    # Still 200: the engine serves; a load balancer must not take it out of rotation for this.
    assert health.status_code == 200
    body = health.json()["background_task_failures"]
    assert body["count"] == 1 and body["latest"][0]["task"] == "to-decode"
    assert "no such replica" in body["latest"][0]["error"]

    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: None, lambda: True, lambda: engine.background_failures))
    assert 'punctual_background_task_failures_total{task="to-decode"} 1.0' in generate_latest(registry).decode()
