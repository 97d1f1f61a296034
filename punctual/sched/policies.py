"""Scheduling policies: which waiting request goes next, and which running one yields memory.

A policy only orders and chooses; it never touches blocks or tensors (the scheduler does).
"""
from __future__ import annotations

from typing import Protocol, Sequence

from punctual.request import Request


class SchedulingPolicy(Protocol):
    name: str

    def order_key(self, request: Request) -> tuple:
        """Sort key: smaller keys are admitted (and kept) first."""

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when blocks run out."""


class FCFSPolicy:
    """First come, first served; preempt the newest arrival (it has the least work to lose)."""

    name = "fcfs"

    def order_key(self, request: Request) -> tuple:
        return (request.arrival_time, request.request_id)

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=self.order_key)


class PriorityPolicy(FCFSPolicy):
    """Lower `priority` first, FCFS within a level; preempt the least important, newest request."""

    name = "priority"

    def order_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)


POLICIES = {policy.name: policy for policy in (FCFSPolicy, PriorityPolicy)}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]()
