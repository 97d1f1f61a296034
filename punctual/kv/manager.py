"""Per-request block tables over the block pool, and automatic prefix caching.

Prefix caching: a full block is identified by a hash chained over all tokens before it, so a
new request reuses the longest run of cached blocks and prefills only the rest. Shared blocks
are never written: only full blocks are shared, and a request always computes at least its
last token itself, into a block of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from punctual.kv.block_pool import BlockHash, BlockPool, check_hash_algo, extend_block_hashes
from punctual.kv.tier import SecondaryTier
from punctual.plan import KVCopyOrders
from punctual.request import Request


@dataclass
class CachedPrefix:
    """The longest cached prefix of a request: blocks still in the pool, then blocks that only
    the second tier holds (to be copied back into fresh blocks)."""

    blocks: list[int] = field(default_factory=list)
    tier_hashes: list[BlockHash] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks) + len(self.tier_hashes)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_tier_slots: int = 0, hash_algo: str = "sha256"):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # sha256: a crafted prompt cannot pose as another's cached prefix; builtin: Python's hash.
        self.hash_algo = check_hash_algo(hash_algo)
        self.pool = BlockPool(num_blocks)
        # Evicted cached blocks go to a second tier and come back from it on a hit.
        self.tier = SecondaryTier(num_tier_slots) if num_tier_slots and enable_prefix_caching else None
        if self.tier is not None:
            self.pool.on_evict = self.tier.store
        # Set by the engine from measured costs: False when copying a block back is slower than
        # recomputing it, so tier hits are ignored.
        self.restore_from_tier = True
        self.prefix_tier_hits = 0  # prompt tokens found only in the tier
        self.block_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # full-block hashes of each request's tokens
        self._num_cached: dict[str, int] = {}  # how many of a request's blocks are indexed
        # Blocks some running request is about to compute: hash -> request id.
        self.pending: dict[BlockHash, str] = {}
        self.pins: dict[str, list[int]] = {}  # pinned prefixes: pin id -> blocks held
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def indexed_blocks(self) -> dict[str, int]:
        """Request id -> how many of its leading blocks are in the prefix-cache index (read-only)."""
        return self._num_cached

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

    # ---- prefix lookup ------------------------------------------------------------------
    def block_hashes(self, request: Request, num_tokens: int) -> list[BlockHash]:
        """Hashes of the request's full blocks, at least those within its first `num_tokens` tokens.

        The memoised list itself, not a copy (it may hold more hashes than asked for): a caller
        reads `[:num_tokens // block_size]`. New blocks are hashed once, from the request's
        appended token list, so a step's cost does not grow with the context.
        """
        hashes = self._hashes.setdefault(request.request_id, [])
        wanted = num_tokens // self.block_size
        if len(hashes) < wanted:
            # The salt keys the whole chain: only requests with the same salt share blocks.
            # The adapter too: LoRA weights change the KV, so adapters never share blocks.
            lora = request.lora_request
            extend_block_hashes(hashes, request.token_ids, self.block_size, wanted, cache_salt=request.cache_salt,
                                adapter_id=None if lora is None else lora.adapter_id, algo=self.hash_algo)
        return hashes

    def computed_prefix(self, request: Request) -> CachedPrefix:
        """Cached blocks holding the longest prefix of the request's tokens (leaves >= 1 token to
        compute): those in the pool, then those only the second tier holds.

        Does not change the cache: the caller passes the result to `allocate`.
        """
        prefix = CachedPrefix()
        # A request asking for its prompt's logprobs must compute every prompt position.
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return prefix
        num_full = self._shareable((request.num_tokens - 1) // self.block_size, request)
        hashes = self.block_hashes(request, request.num_tokens - 1)
        for i in range(num_full):
            block_id = self.pool.lookup(hashes[i])
            if block_id is None:
                break
            prefix.blocks.append(block_id)
        if self.tier is not None and self.restore_from_tier:
            for block_hash in hashes[len(prefix.blocks):num_full]:
                if self.tier.lookup(block_hash) is None:
                    break
                prefix.tier_hashes.append(block_hash)
        return prefix

    @staticmethod
    def _shareable(num_blocks: int, request: Request) -> int:
        """`num_blocks` leading blocks, capped at those the request may share (attention sinks)."""
        limit = request.shareable_blocks
        return num_blocks if limit is None else min(num_blocks, limit)

    def first_pending_owner(self, request: Request, num_cached_blocks: int) -> str | None:
        """If the request's first uncached block is being computed by another request, that request's id."""
        hashes = self.block_hashes(request, request.num_tokens - 1)
        if num_cached_blocks < self._shareable((request.num_tokens - 1) // self.block_size, request):
            owner = self.pending.get(hashes[num_cached_blocks])
            if owner is not None and owner != request.request_id:
                return owner
        return None

    # ---- allocation ---------------------------------------------------------------------
    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        have = len(self.block_tables.get(request_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def allocate(self, request: Request, num_tokens: int, computed: CachedPrefix | list[int] = ()) -> bool:
        """Grow the request's table to cover `num_tokens`, starting from `computed` (cache hits)
        for a request that holds none yet. False, with nothing changed, if blocks are short."""
        request_id = request.request_id
        table = self.block_tables.get(request_id)
        if table is None:
            if not isinstance(computed, CachedPrefix):
                computed = CachedPrefix(list(computed))
            computed_blocks, tier_hashes = computed.blocks, computed.tier_hashes
            # Hits sitting in the free queue stop being free once touched.
            reclaimed = sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)
            need = self.blocks_for(num_tokens) - len(computed_blocks)
            if need > self.pool.num_free_blocks - reclaimed:
                return False
            self.pool.touch(list(computed_blocks))
            table = self.block_tables[request_id] = list(computed_blocks)
            if tier_hashes:
                # Fresh blocks, filled from the tier before the step runs, then indexed as cached.
                restored = self.pool.allocate(len(tier_hashes))
                for block_id, block_hash in zip(restored, tier_hashes):
                    self.tier.restore(block_hash, block_id)
                    self.pool.cache(block_id, block_hash)
                table.extend(restored)
                need -= len(restored)
            self._num_cached[request_id] = len(table)
            if self.enable_prefix_caching:
                self.prefix_queries += request.num_prompt_tokens
                self.prefix_hits += min(len(table) * self.block_size, request.num_prompt_tokens)
                self.prefix_tier_hits += min(len(tier_hashes) * self.block_size, request.num_prompt_tokens)
                hashes = self.block_hashes(request, request.num_tokens)
                for i in range(len(table), self._shareable(request.num_tokens // self.block_size, request)):
                    self.pending.setdefault(hashes[i], request_id)
        else:
            need = self.num_new_blocks(request_id, num_tokens)
            if need > self.pool.num_free_blocks:
                return False
        if need > 0:
            table.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Index the request's blocks that its computed tokens have filled."""
        if not self.enable_prefix_caching:
            return
        request_id = request.request_id
        table = self.block_tables[request_id]
        start = self._num_cached[request_id]
        num_full = self._shareable(request.num_computed_tokens // self.block_size, request)
        if num_full <= start:
            return
        hashes = self.block_hashes(request, request.num_computed_tokens)
        for i in range(start, num_full):
            self.pool.cache(table[i], hashes[i])
            if self.pending.get(hashes[i]) == request_id:
                del self.pending[hashes[i]]
        self._num_cached[request_id] = num_full

    def free(self, request: Request) -> None:
        """Release every block of the request (finish, abort or preemption); cached ones stay indexed."""
        request_id = request.request_id
        table = self.block_tables.pop(request_id, None)
        if table:
            # Tail first: among blocks freed together, the deepest is evicted first.
            self.pool.release(table[::-1])
        self._num_cached.pop(request_id, None)
        for block_hash in self._hashes.pop(request_id, ()):
            if self.pending.get(block_hash) == request_id:
                del self.pending[block_hash]

    def evict_blocks(self, request: Request, first: int, count: int) -> None:
        """Attention sinks: free `count` blocks of the request's table from index `first` (the
        oldest of its window), closing the gap; the runner re-rotates the blocks after them. Only
        blocks the request alone holds move: it shares none past `shareable_blocks` (asserted)."""
        table = self.block_tables[request.request_id]
        limit = request.shareable_blocks
        assert limit is not None and first >= limit and first + count <= len(table), \
            f"{request.request_id}: cannot evict blocks {first}..{first + count} of {len(table)}"
        assert all(self.pool.ref_counts[b] == 1 and self.pool.block_hash[b] is None for b in table[first:]), \
            f"{request.request_id}: a window block is shared or indexed"
        evicted = table[first:first + count]
        del table[first:first + count]
        # Never indexed (past shareable_blocks), so freed blank: no stale hash can point at them.
        self.pool.release(evicted[::-1])

    # ---- KV received from another engine ---------------------------------------------------
    def reserve(self, owner_id: str, num_blocks: int) -> bool:
        """Grow (or start) a table of fresh blocks for KV that another engine is sending; the
        table becomes the request's when it is adopted. False, with nothing changed, if short."""
        table = self.block_tables.get(owner_id)
        need = num_blocks - (len(table) if table is not None else 0)
        if need > self.pool.num_free_blocks:
            return False
        if table is None:
            table = self.block_tables[owner_id] = []
            self._num_cached[owner_id] = 0  # indexed once its tokens are known (cache_full_blocks)
        if need > 0:
            table.extend(self.pool.allocate(need))
        return True

    def release_reservation(self, owner_id: str) -> None:
        table = self.block_tables.pop(owner_id, None)
        if table:
            self.pool.release(table[::-1])
        self._num_cached.pop(owner_id, None)

    # ---- pinning (Prompt Cache's prompt modules) -------------------------------------------
    def pin(self, pin_id: str, request: Request) -> int:
        """Hold an extra reference to the request's cached full blocks so they are never evicted.

        Returns the number of tokens pinned (whole blocks of the request's computed prefix).
        """
        if pin_id in self.pins:
            raise ValueError(f"pin_id {pin_id!r} is already pinned")
        blocks = []
        num_full = request.num_computed_tokens // self.block_size
        for block_hash in self.block_hashes(request, request.num_computed_tokens)[:num_full]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        self.pool.touch(blocks)
        self.pins[pin_id] = blocks
        return len(blocks) * self.block_size

    def unpin(self, pin_id: str) -> bool:
        blocks = self.pins.pop(pin_id, None)
        if blocks is None:
            return False
        self.pool.release(blocks[::-1])
        return True

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def take_kv_copies(self) -> KVCopyOrders:
        """The copies between the pool and the tier that the runner must make before this step."""
        return self.tier.take_transfers() if self.tier is not None else KVCopyOrders()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        if self.tier is not None:
            self.tier.check_integrity()
        owned: dict[int, int] = {}
        for table in [*self.block_tables.values(), *self.pins.values()]:
            for block_id in table:
                owned[block_id] = owned.get(block_id, 0) + 1
        for block_id, refs in enumerate(self.pool.ref_counts):
            assert owned.get(block_id, 0) == refs, f"block {block_id}: {refs} refs, {owned.get(block_id, 0)} owners"
        assert all(owner in self.block_tables for owner in self.pending.values()), "pending hash of a freed request"
        for pin_id, blocks in self.pins.items():
            for block_id in blocks:  # a pinned block stays findable by its hash, or the pin is useless
                block_hash = self.pool.block_hash[block_id]
                assert block_hash is not None and self.pool.cached.get(block_hash) == block_id, \
                    f"pin {pin_id!r}: block {block_id} is not in the prefix-cache index"
