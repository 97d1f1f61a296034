"""What the cluster client knows of its replicas and of each request it routed: plain data."""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from punctual.request import EngineCoreRequest

if TYPE_CHECKING:
    from punctual.engine.client import EngineCoreClient
    from punctual.engine.messages import PinAck


@dataclass
class Replica:
    replica_id: int
    client: EngineCoreClient | None = None
    state: str = "starting"  # starting | ready | restarting | dead | stopped
    host: str = ""
    pid: int | None = None
    request_ids: set[str] = field(default_factory=set)
    # Pins and unpins sent to this replica, in order, awaiting its acks (None: a re-pin after a
    # restart, whose ack nobody waits for).
    pin_queue: deque = field(default_factory=deque)
    role: str = "mixed"  # mixed | prefill | decode
    draining: bool = False  # no new requests; its running ones were moved off
    step_s: float | None = None  # its decode step time, as seen from here (between output updates)
    last_output_at: float | None = None

    @property
    def routable(self) -> bool:
        return self.state == "ready" and not self.draining

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass
class RoutedRequest:
    request: EngineCoreRequest  # as first submitted
    replica_id: int
    delivered: list[int] = field(default_factory=list)  # tokens handed to the front end so far
    started: bool = False  # its first token arrived (no longer queued prefill)
    migrating: bool = False  # a migration of it is under way
    pd_moved: bool = False  # prefill/decode: its move to a decode replica was tried
    held: bool = False  # not sent yet: a less important request is being moved off to make room

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV it holds or will: its prompt and what it generated so far."""
        return len(self.request.prompt_token_ids) + len(self.delivered)


@dataclass
class PinOp:
    """A pin or unpin broadcast to several replicas: answered once every one of them has."""

    waiting: set[int]
    acks: list[PinAck] = field(default_factory=list)
    name_replica: bool = False  # a refusal's error says which replica refused


def resumed_request(routed: RoutedRequest) -> EngineCoreRequest | None:
    """The request to run elsewhere so that its stream continues where it stopped; None when
    that cannot be done exactly (its grammar's state lives in the dead replica)."""
    original = routed.request
    params = original.sampling_params
    if params.structured is not None:
        return None
    done = len(routed.delivered)
    if not done:
        return original
    max_tokens = None if params.max_tokens is None else params.max_tokens - done
    if max_tokens is not None and max_tokens < 1:
        return None  # its last token was delivered without a finish: nothing left to resume
    params = dataclasses.replace(params, max_tokens=max_tokens, min_tokens=max(0, params.min_tokens - done))
    return dataclasses.replace(original, prompt_token_ids=list(original.prompt_token_ids) + routed.delivered,
                               sampling_params=params)
