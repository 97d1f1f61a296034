"""A fixed pool of KV blocks with reference counts and a free list.

Pure Python: the tensors that hold K and V live in the model runner; this module only decides
which block ids are in use, so the scheduler and the simulator can build it without a device.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks with ref count 1; the caller checked there are enough."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block_id in blocks:
            self.ref_counts[block_id] = 1
        return blocks

    def share(self, block_id: int) -> None:
        """One more owner of an allocated block (a shared prefix, a forked sample)."""
        assert self.ref_counts[block_id] > 0, f"block {block_id} is free"
        self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody owns go back to the free list."""
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"double free of block {block_id}"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free.append(block_id)

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for block_id, refs in enumerate(self.ref_counts):
            assert refs >= 0, f"block {block_id} has negative refs"
            assert (refs == 0) == (block_id in free), f"block {block_id}: refs={refs}, free={block_id in free}"
