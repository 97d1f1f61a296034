"""The one interface every proposer implements (prompt lookup, a draft model).

A proposer is asked twice per step. Before scheduling, `available` says how many tokens it
could propose for each decoding request (prompt lookup looks them up now; a draft model, which
pays a forward per drafted token, only promises up to its limit). The scheduler then chooses
how many to verify within the step's budget, and `propose` produces exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from punctual.request import Request


@dataclass
class Proposal:
    token_ids: list[int]
    probs: Any = None  # [len(token_ids), vocab] proposal distributions (a tensor); None when deterministic


class Proposer(Protocol):
    name: str
    # Time to draft one more token for the whole batch (0 for prompt lookup): the adaptive length
    # weighs it against what a deeper proposal gains.
    depth_cost_s: float

    def available(self, request: Request, max_tokens: int) -> int:
        """Tokens it can propose for the request's next position (at most `max_tokens`)."""

    def propose(self, wanted: list[tuple[Request, int]]) -> dict[str, Proposal]:
        """Proposals for each (request, k), at most k tokens each; a request may be left out."""

    def forget(self, request_id: str) -> None:
        """Drop the request's state (finished, aborted or preempted)."""
