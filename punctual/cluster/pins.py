"""Pinned prefixes and LoRA adapters over a cluster: every pin, unpin, adapter load and unload is
broadcast (each replica holds the prefix or checks the adapter, so any may serve its users) and
answered once every replica has acked it."""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable

from punctual.cluster.replica_set import ReplicaSet
from punctual.cluster.state import PinOp, Replica
from punctual.engine.client import EngineCoreClient, EngineDeadError
from punctual.engine.messages import PinAck


class PinBroadcast:
    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas
        # Pinned prefixes (tokens, cache salt), re-sent to a restarted replica.
        self.pins: dict[str, tuple[list[int], str | None]] = {}
        self._ops: deque[PinOp] = deque()  # in the order sent: answered in that order

    def pin(self, pin_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        self.pins[pin_id] = (list(prompt_token_ids), cache_salt)
        self._broadcast(lambda client: client.pin_prefix(pin_id, prompt_token_ids, cache_salt))

    def unpin(self, pin_id: str) -> None:
        self.pins.pop(pin_id, None)
        self._broadcast(lambda client: client.unpin_prefix(pin_id))

    def load_lora(self, lora_request) -> None:
        # A refusal names its replica: a bad path on one host is not the adapter's fault.
        self._broadcast(lambda client: client.load_lora(lora_request), name_replica=True)

    def unload_lora(self, lora_int_id: int) -> None:
        self._broadcast(lambda client: client.unload_lora(lora_int_id))

    def _broadcast(self, send: Callable[[EngineCoreClient], None], name_replica: bool = False) -> None:
        ready = self.replicas.ready
        if not ready:
            raise EngineDeadError("no replica of the cluster is running")
        op = PinOp({r.replica_id for r in ready}, name_replica=name_replica)
        self._ops.append(op)
        for replica in ready:
            replica.pin_queue.append(op)
            send(replica.client)

    def on_acks(self, replica: Replica, acks: list[PinAck]) -> None:
        """A replica answered its oldest pins and unpins, in the order they were sent."""
        for ack in acks:
            op = replica.pin_queue.popleft()
            if op is not None:
                if op.name_replica and not ack.ok:
                    ack = dataclasses.replace(ack, error=f"replica {replica.replica_id}: {ack.error}")
                op.acks.append(ack)
                op.waiting.discard(replica.replica_id)

    def on_death(self, replica: Replica) -> None:
        """A dead replica answers nothing: its pending pins wait for the others only."""
        for op in replica.pin_queue:
            if op is not None:
                op.waiting.discard(replica.replica_id)
        replica.pin_queue.clear()

    def repin(self, replica: Replica) -> None:
        """Give a restarted replica every pin back (acks nobody waits for)."""
        for pin_id, (token_ids, cache_salt) in self.pins.items():
            replica.pin_queue.append(None)
            replica.client.pin_prefix(pin_id, token_ids, cache_salt)

    def answered(self) -> list[PinAck]:
        """Answers to broadcast pins that every replica has acked, in order: the first refusal, else the first ack."""
        acks = []
        while self._ops and not self._ops[0].waiting:
            op = self._ops.popleft()
            refusals = [a for a in op.acks if not a.ok]
            if refusals:
                acks.append(refusals[0])
            elif op.acks:
                acks.append(op.acks[0])
            else:
                acks.append(PinAck("", False, 503, "every replica died before answering"))
        return acks
