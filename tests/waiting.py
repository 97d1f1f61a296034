"""Waiting for a condition with a deadline, the one way tests synchronise with servers and threads.

The timeout is a deadline for a condition that should come true, generous for a loaded machine;
it is never a measurement: no test asserts how fast something happened.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")


def _fail(timeout: float, message: str | Callable[[], str]) -> None:
    pytest.fail(f"not within {timeout:g} s: {message() if callable(message) else message}")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, message: str | Callable[[], str] = "",
               interval: float = 0.01) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail the test with
    `message` (a string, or a callable giving the state to show) once `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            _fail(timeout, message)
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], timeout: float = 10.0,
                           message: str | Callable[[], str] = "", interval: float = 0.005) -> T:
    """`wait_until` inside an event loop: polls without blocking the loop's other tasks."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            _fail(timeout, message)
        await asyncio.sleep(interval)
