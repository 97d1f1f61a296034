"""The second KV tier: where evicted prefix-cache blocks go instead of being forgotten.

Pure Python bookkeeping (which block hash sits in which slot of the tier, least recently used
first); the model runner holds the slots' tensors (host memory on CUDA, a compressed int8
store on CPU) and moves the data. When the block pool evicts a cached block, the KV manager
stores its hash here and queues a copy out; when a new request's prefix runs past the blocks
still in the pool, the next blocks are looked up here and copied back into fresh blocks
instead of being recomputed.

Within one step every copy out runs before every copy in (a block evicted and refilled in the
same step must be saved first), and a slot that a copy in of this step reads is never handed
to a copy out of the same step.
"""
from __future__ import annotations

from collections import OrderedDict

from punctual.kv.block_pool import BlockHash
from punctual.plan import KVCopyOrders

TierTransfers = KVCopyOrders  # the tier's copies travel in the step plan


class SecondaryTier:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"the KV tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.slots: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self._free = list(range(num_slots - 1, -1, -1))
        self._read_this_step: set[int] = set()
        self.transfers = TierTransfers()
        self.num_stored = 0  # blocks copied out
        self.num_restored = 0  # blocks copied back in
        self.num_dropped = 0  # tier entries overwritten by newer ones

    def __len__(self) -> int:
        return len(self.slots)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.slots.get(block_hash)

    def store(self, block_id: int, block_hash: BlockHash) -> None:
        """Queue a copy of an evicted pool block into the tier (no-op if the tier has it already)."""
        if block_hash in self.slots:
            self.slots.move_to_end(block_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return  # every slot is being read this step: drop the block, it will be recomputed
        self.slots[block_hash] = slot
        self.transfers.swap_out.append((block_id, slot))
        self.num_stored += 1

    def restore(self, block_hash: BlockHash, block_id: int) -> None:
        """Queue a copy of the tier's copy of `block_hash` into pool block `block_id`."""
        slot = self.slots[block_hash]
        self.slots.move_to_end(block_hash)
        self._read_this_step.add(slot)
        self.transfers.swap_in.append((slot, block_id))
        self.num_restored += 1

    def take_transfers(self) -> TierTransfers:
        """The step's copies; the tier starts a new step."""
        transfers, self.transfers = self.transfers, TierTransfers()
        self._read_this_step.clear()
        return transfers

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for block_hash, slot in self.slots.items():  # least recently used first
            if slot not in self._read_this_step:
                del self.slots[block_hash]
                self.num_dropped += 1
                return slot
        return None

    def check_integrity(self) -> None:
        used = list(self.slots.values())
        assert len(set(used)) == len(used), "a tier slot holds two blocks"
        assert not set(used) & set(self._free), "a tier slot is both used and free"
        assert len(used) + len(self._free) == self.num_slots, "tier slots leaked"
