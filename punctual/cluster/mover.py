"""Moving a running request to another replica with its KV (Llumnix-style live migration):
multi-stage pre-copy while it keeps decoding at the source, then one stop-and-copy of the last
blocks and its state. Each copy round's time feeds the transport's cost estimate that drain,
rebalancing, room-making and prefill/decode moves weigh (transport.py)."""
from __future__ import annotations

import logging
import time

from punctual.cluster import migration as policy
from punctual.cluster.failover import Failover
from punctual.cluster.ledger import Ledger
from punctual.cluster.state import RoutedRequest
from punctual.cluster.transport import KVChannel
from punctual.engine.client import EngineDeadError
from punctual.engine.messages import KVAnswer

logger = logging.getLogger(__name__)

MAX_RECORDS = 1000  # migration records kept for GET /admin/migrations


class MoveOff(Exception):
    """The move is called off; the request goes on where it is (or was resumed meanwhile)."""


class Migration:
    """One move of `request_id` from its replica to `target_id`; run() once. Its steps, in order:
    reserve room at the target, pre-copy rounds, stop the request at the source and copy the
    rest, commit at the target. `record` is what GET /admin/migrations shows of it."""

    def __init__(self, mover: "Mover", routed: RoutedRequest, target_id: int, reason: str):
        self.mover = mover
        self.ledger, self.channel, self.failover = mover.ledger, mover.channel, mover.failover
        self.routed = routed
        self.request_id = routed.request.request_id
        self.source_id = routed.replica_id
        self.target_id = target_id
        self.transport = self.channel.transport(self.source_id, target_id)
        self.cost = self.channel.transfer_cost(self.transport)
        self.num_tokens = routed.num_tokens
        self.int8 = mover.cluster.kv_transfer_int8
        self.record = {"request_id": self.request_id, "source": self.source_id, "target": target_id,
                       "reason": reason, "ok": False, "precopy_blocks": 0, "final_blocks": 0,
                       "transport": self.transport,
                       "predicted_transfer_s": self.channel.predicted_transfer_s(self.source_id, target_id,
                                                                                 self.num_tokens),
                       "transfer_s": 0.0, "transfer_bytes": 0, "core_s": 0.0}
        self.reserved = False  # the target holds blocks for it: released unless the commit adopts them
        self.in_flight = None  # a payload sent and not yet taken by the target: dropped if the move is off
        self.copied = 0  # blocks the target has

    async def run(self) -> bool:
        """True when the request runs at the target. On a refusal or a failure before the source
        let it go, it simply goes on at the source; after (the target refused the commit), it is
        resumed by recompute, on the source if it can take it."""
        self.routed.migrating = True
        started = time.monotonic()
        try:
            await self.reserve()
            await self.precopy()
            out = await self.stop_at_source()
            await self.commit(out)
            self.record["ok"] = True
            return True
        except MoveOff as off:
            self.record["error"] = str(off)
            return False
        except EngineDeadError as exc:
            # A replica died: its death handler resumed whatever it held (the request is mapped to
            # the source until the commit is sent, to the target after).
            self.record["error"] = str(exc)
            return False
        finally:
            self.clean_up(started)

    def still_ours(self) -> bool:
        """The request is still this move's to make: not finished, aborted or resumed elsewhere."""
        return self.ledger.requests.get(self.request_id) is self.routed and self.routed.replica_id == self.source_id

    async def reserve(self) -> None:
        """Ask the target for room for every block of the request."""
        block_size = self.mover.block_size
        answer = await self.channel.ask(self.target_id, "kv_reserve", self.request_id,
                                        -(-self.num_tokens // block_size))
        self.reserved = True  # a refused reservation holds nothing, and aborting it is harmless
        if not answer.ok or not self.still_ours():
            raise MoveOff("the target has no room" if not answer.ok else "gone meanwhile")

    async def precopy(self) -> None:
        """Copy the blocks the request has while it keeps decoding at the source, in rounds, until
        a round leaves few enough for the stop-and-copy."""
        for _ in range(policy.MAX_PRECOPY_ROUNDS):
            round_started = time.monotonic()
            answer = await self.channel.ask(self.source_id, "kv_export", self.request_id, self.copied, None,
                                            self.int8, self.transport)
            if not answer.ok or not self.still_ours() or not answer.num_blocks:
                self.channel.discard(answer.payload, self.source_id)  # off, or an empty payload: nothing to carry
            if not answer.ok or not self.still_ours():
                raise MoveOff(answer.error or "gone meanwhile")
            if answer.num_blocks:
                received = await self.copy_round(answer, round_started, "kv_receive", self.request_id,
                                                 self.copied, answer.payload)
                if not received.ok or not self.still_ours():
                    raise MoveOff(received.error or "gone meanwhile")
                self.copied += answer.num_blocks
            if answer.num_blocks <= policy.STOP_AND_COPY_BLOCKS:
                break
        self.record["precopy_blocks"] = self.copied

    async def stop_at_source(self) -> KVAnswer:
        """Take the request out of the source with the blocks not copied yet; from here on the
        source no longer runs it. Maps it to the target before its first output can arrive (a
        death of the target from now on finds it there and resumes it like its other requests)."""
        self.stopped = time.monotonic()
        out = await self.channel.ask(self.source_id, "kv_migrate_out", self.request_id, self.copied, self.int8,
                                     self.transport)
        if not out.ok or not self.still_ours():  # finished or preempted meanwhile: it stays
            self.channel.discard(out.payload, self.source_id)
            raise MoveOff(out.error or "gone meanwhile")
        self.record["final_blocks"] = out.num_blocks
        replicas = self.ledger.replicas
        source, target = replicas[self.source_id], replicas[self.target_id]
        if not target.ready:  # it died meanwhile: the source let go, so recompute there
            self.channel.discard(out.payload, self.source_id)
            self.failover.resume_by_recompute(self.request_id, prefer=self.source_id)
            raise MoveOff(f"replica {self.target_id} died")
        # Every token the source made came before this answer: the target's come next.
        source.request_ids.discard(self.request_id)
        target.request_ids.add(self.request_id)
        self.routed.replica_id = self.target_id
        self.reserved = False  # commit_import adopts the blocks or releases them
        return out

    async def commit(self, out: KVAnswer) -> None:
        """Carry the last blocks and the request's state to the target, which then runs it."""
        committed = await self.copy_round(out, self.stopped, "kv_commit", out.state, self.copied, out.payload)
        target = self.ledger.replicas[self.target_id]
        if self.ledger.requests.get(self.request_id) is not self.routed:  # the client went away meanwhile
            if committed.ok:
                target.client.abort_requests([self.request_id])
            raise MoveOff("gone meanwhile")
        if not committed.ok:
            target.request_ids.discard(self.request_id)
            self.failover.resume_by_recompute(self.request_id, prefer=self.source_id)
            raise MoveOff("the target refused the commit")
        self.record["downtime_s"] = time.monotonic() - self.stopped

    async def copy_round(self, export: KVAnswer, round_started: float, command: str, *args) -> KVAnswer:
        """Carry one exported payload to the target and hand it over; the round's time (from
        `round_started`, before the export) is one observation of the transport's cost."""
        self.in_flight = export.payload
        await self.channel.carry(self.source_id, self.target_id, export.payload)
        answer = await self.channel.ask(self.target_id, command, *args)
        if answer.ok:
            self.in_flight = None
        seconds = time.monotonic() - round_started
        self.record["transfer_s"] += seconds
        self.record["transfer_bytes"] += export.nbytes
        self.record["core_s"] += export.seconds + answer.seconds  # encoding at the source, decoding at the target
        if export.num_blocks:
            self.cost.observe(export.num_blocks, seconds, export.nbytes)
        return answer

    def clean_up(self, started: float) -> None:
        """Whatever the outcome: release what the target reserved, drop a payload left in
        flight, and keep the record."""
        self.routed.migrating = False
        self.channel.discard(self.in_flight, self.source_id, self.target_id)
        if self.reserved:
            self.channel.tell(self.target_id, "kv_abort_import", self.request_id)
        record = self.record
        record["seconds"] = time.monotonic() - started
        record["estimate"] = self.cost.as_dict()  # the copy cost as learned so far, this move included
        self.mover.migrations.append(record)
        del self.mover.migrations[:-MAX_RECORDS]
        if not record["ok"]:
            logger.info("migration of %s from %d to %d did not happen: %s", self.request_id, self.source_id,
                        self.target_id, record.get("error"))


class Mover:
    """Starts migrations and keeps their records."""

    def __init__(self, ledger: Ledger, channel: KVChannel, failover: Failover):
        self.ledger, self.channel, self.failover = ledger, channel, failover
        self.cluster = ledger.replicas.cluster
        self.block_size = ledger.block_size
        self.migrations: list[dict] = []  # one record per finished migration attempt (GET /admin/migrations)

    async def migrate(self, request_id: str, target_id: int, reason: str = "") -> bool:
        """Move a running request to `target_id` with its KV; True when it runs there (see
        Migration.run). False at once when it is not running, is being moved, or is there."""
        routed = self.ledger.requests.get(request_id)
        if routed is None or routed.migrating or not routed.started or routed.replica_id == target_id:
            return False
        return await Migration(self, routed, target_id, reason).run()
