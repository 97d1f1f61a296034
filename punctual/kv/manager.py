"""Per-request block tables over the block pool: the KV memory each request owns."""
from __future__ import annotations

from punctual.kv.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table covers `num_tokens` tokens."""
        have = len(self.block_tables.get(request_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks(request_id, num_tokens) <= self.pool.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to cover `num_tokens`; False (and no change) if blocks are short."""
        need = self.num_new_blocks(request_id, num_tokens)
        if need > self.pool.num_free_blocks:
            return False
        table = self.block_tables.setdefault(request_id, [])
        if need:
            table.extend(self.pool.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        """Release every block of the request (finish, abort or preemption)."""
        table = self.block_tables.pop(request_id, None)
        if table:
            # Reverse: the tail blocks are the least likely to be shared, free them first.
            self.pool.release(table[::-1])

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        owned: dict[int, int] = {}
        for table in self.block_tables.values():
            for block_id in table:
                owned[block_id] = owned.get(block_id, 0) + 1
        for block_id, refs in enumerate(self.pool.ref_counts):
            assert owned.get(block_id, 0) == refs, f"block {block_id}: {refs} refs, {owned.get(block_id, 0)} owners"
