"""How KV moves between replicas: kv_* commands and their answers, the transport a move takes,
and what each transport's copy rounds have been seen to cost.

Three transports (--kv-transport): relay (the source's kv_* answer carries the payload, already
encoded, and the front end sends it on over the target's socket), object-store (the payload
waits in the source actor; the front end has Ray carry it to the target actor, handling only the
ObjectRef), or direct (a shared-memory segment that the target maps; only its name passes
through here).
"""
from __future__ import annotations

import asyncio
import itertools

from punctual.cluster import migration as policy
from punctual.cluster.replica_set import ReplicaSet
from punctual.engine.client import EngineDeadError
from punctual.engine.messages import KVAnswer
from punctual.wire.kv import StagedKV


class KVChannel:
    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas
        self._ops: dict[int, tuple[int, asyncio.Future]] = {}  # op_id -> (replica, answer)
        self._op_ids = itertools.count()
        self.transfer_costs: dict[str, policy.TransferCost] = {}  # per transport used: one copy round's cost

    async def ask(self, rid: int, kind: str, *args) -> KVAnswer:
        """Send one kv_* command to a replica and wait for its answer (EngineDeadError if it dies)."""
        replica = self.replicas[rid]
        if not replica.ready:
            raise EngineDeadError(f"replica {rid} is not running")
        op_id = next(self._op_ids)
        future = asyncio.get_running_loop().create_future()
        self._ops[op_id] = (rid, future)
        replica.client.kv_command(kind, (op_id, *args))
        return await future

    def tell(self, rid: int, kind: str, *args) -> None:
        """Send a kv_* command whose answer nobody waits for, if the replica runs."""
        if self.replicas[rid].ready:
            self.replicas[rid].client.kv_command(kind, (next(self._op_ids), *args))

    def on_answers(self, answers: list[KVAnswer]) -> None:
        for answer in answers:
            _, future = self._ops.pop(answer.op_id, (None, None))
            if future is not None and not future.done():  # None: a command told, not asked
                future.set_result(answer)

    def on_death(self, rid: int) -> None:
        """Fail every question a dead replica will not answer."""
        for op_id, (op_rid, future) in list(self._ops.items()):
            if op_rid == rid:
                del self._ops[op_id]
                if not future.done():
                    future.set_exception(EngineDeadError(f"replica {rid} died"))

    def transport(self, source_id: int, target_id: int) -> str:
        """The transport a move between these two replicas takes: the configured one, except that
        a shared-memory segment cannot reach another host, nor the object store replicas that are
        not Ray actors (cluster/inprocess.py): relay then."""
        transport = self.replicas.cluster.kv_transport
        if transport == "direct" and self.replicas[source_id].host != self.replicas[target_id].host:
            return "relay"
        if transport == "object-store" and not getattr(self.replicas.launcher, "actors", None):
            return "relay"
        return transport

    def transfer_cost(self, transport: str) -> policy.TransferCost:
        return self.transfer_costs.setdefault(transport, policy.TransferCost())

    def predicted_transfer_s(self, source_id: int, target_id: int, num_tokens: int) -> float:
        """A whole move's copy time (every block of `num_tokens`), as the estimate stands."""
        blocks = -(-num_tokens // self.replicas.config.cache.block_size)
        return self.transfer_cost(self.transport(source_id, target_id)).predict(blocks)

    async def carry(self, source_id: int, target_id: int, payload) -> None:
        """Object store: have Ray move a staged payload from the source actor to the target actor.
        The ObjectRef is the front end's (freed when dropped); the arrays never come here."""
        if not isinstance(payload, StagedKV):
            return  # relay: it rides in the kv_receive command; direct: only the segment's name does
        actors = self.replicas.launcher.actors
        try:
            await actors[target_id].stage_kv.remote(payload.key, actors[source_id].take_kv.remote(payload.key))
        except Exception as exc:  # an actor died or the store refused: the move is off
            raise EngineDeadError(f"the object store did not carry the KV: {exc}") from exc

    def discard(self, payload, *replica_ids: int) -> None:
        """Drop a payload a called-off move left behind (a segment, a staged entry), on each side."""
        if payload is None or isinstance(payload, bytes):
            return
        for rid in replica_ids:
            self.tell(rid, "kv_discard", payload)
