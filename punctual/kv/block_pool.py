"""A fixed pool of KV blocks: reference counts, an LRU free queue, and the prefix-cache index.

Pure Python: the tensors that hold K and V live in the model runner; this module only decides
which block ids are in use, so the scheduler and the simulator can build it without a device.

A full block whose owners have all finished keeps its contents and its hash: it sits in the
free queue, reusable by a later request with the same prefix until the pool needs the space.
The queue is least-recently-freed first; a sequence's blocks are released tail first, so among
blocks freed together the deepest is evicted first (it is the least likely to be shared).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from functools import lru_cache
from itertools import islice
from typing import Callable, Sequence

# A block's identity in the prefix cache: a SHA-256 digest (32 bytes) by default, or a 64-bit
# int under the builtin hash. Either is the same in every process: the router in the front end
# matches prompts against the hashes that replicas report.
BlockHash = bytes | int
HASH_ALGOS = ("sha256", "builtin")


@lru_cache(maxsize=4096)
def chain_root(cache_salt: str | None = None, adapter_id: str | None = None) -> bytes:
    """The virtual parent of a chain's first block: what every block of the chain inherits.

    Requests share cached blocks only when their roots match, so the cache salt (a tenant's
    isolation) and the adapter (LoRA weights change the KV) live here. Length-prefixed, so no
    two (salt, adapter) pairs encode alike; "" is no salt, as in vLLM.
    """
    message = bytearray(b"punctual.kv.block-hash.v1")
    for part in (cache_salt or "", adapter_id or ""):
        data = part.encode()
        message += len(data).to_bytes(8, "little") + data
    return hashlib.sha256(message).digest()


@lru_cache(maxsize=64)
def _token_packer(count: int) -> Callable[..., bytes]:
    # 8 little-endian bytes a token: no id is too large, and hosts of either byte order agree.
    # A precompiled struct packs a block's ids faster than array(...).tobytes() (a micro-benchmark).
    return struct.Struct(f"<{count}q").pack


def _sha256_block(parent: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None,
                  adapter_id: str | None) -> bytes:
    # Every input is a 32-byte digest then the tokens: a first block's root is a digest of its own
    # domain-separated message, so it cannot pose as a real parent (that would be a SHA-256 collision).
    if parent is None:
        parent = chain_root(cache_salt, adapter_id)
    return hashlib.sha256(parent + _token_packer(len(token_ids))(*token_ids)).digest()


def _builtin_block(parent: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None,
                   adapter_id: str | None) -> int:
    # Python's hash of ints and tuples of ints does not depend on PYTHONHASHSEED (strings do, so the
    # salt enters as an int taken from its SHA-256 root). Fast, but 64 bits and not collision
    # resistant: two crafted blocks can share a hash, and so each other's KV.
    if parent is None:
        namespace = 0 if not (cache_salt or adapter_id) else int.from_bytes(
            chain_root(cache_salt, adapter_id)[:8], "little", signed=True)
        return hash((namespace, tuple(token_ids)))
    return hash((0, parent, tuple(token_ids)))


_BLOCK_HASHERS = {"sha256": _sha256_block, "builtin": _builtin_block}


def check_hash_algo(algo: str) -> str:
    if algo not in _BLOCK_HASHERS:
        raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}, got {algo!r}")
    return algo


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None = None,
               adapter_id: str | None = None, algo: str = "sha256") -> BlockHash:
    """Hash of a full block, chained over every block before it (`parent`, None for the first).

    The salt and the adapter are mixed into the first block only: every later block inherits
    them through its parent.
    """
    return _BLOCK_HASHERS[check_hash_algo(algo)](parent, token_ids, cache_salt, adapter_id)


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, num_blocks: int,
                        cache_salt: str | None = None, adapter_id: str | None = None,
                        algo: str = "sha256") -> list[BlockHash]:
    """Append to `hashes` (a chain over `token_ids`' leading blocks) until it covers `num_blocks`
    full blocks; returns `hashes`. New blocks only: a step's cost does not grow with the context."""
    hasher = _BLOCK_HASHERS[check_hash_algo(algo)]
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_blocks):
        parent = hasher(parent, token_ids[i * block_size:(i + 1) * block_size], cache_salt, adapter_id)
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Built in C: a simulated cluster makes a pool of ~100k blocks per replica, a thousand times.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.num_evictions = 0
        # Called with (block id, hash) when a cached block is evicted, before its reuse (the KV tier).
        self.on_evict: Callable[[int, BlockHash], None] | None = None
        # Hashes indexed and dropped since the last take_events(): a cluster router learns from
        # them which replica holds which prefix (vLLM's KV events). One append per block, and
        # only when asked: nothing drains them in a single engine.
        self.record_events = False
        self.stored_events: list[BlockHash] = []
        self.evicted_events: list[BlockHash] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody owns, including cached ones that can be evicted."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks with ref count 1, evicting cached contents least recently used first."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            self._uncache(block_id)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def next_free(self, count: int) -> list[int]:
        """The blocks the next `count` allocations take, in order, if nothing is freed meanwhile
        (read-only)."""
        return list(islice(self._free, count))

    def touch(self, block_ids: list[int]) -> None:
        """One more owner of each block (a prefix-cache hit); a free cached block leaves the queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody owns go to the back of the free queue."""
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"double free of block {block_id}"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """Index a full block by its hash; if another block already holds the same content, keep that one."""
        if block_hash not in self.cached and self.block_hash[block_id] is None:
            self.cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash
            if self.record_events:
                self.stored_events.append(block_hash)

    def _uncache(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hash[block_id] = None
            self.num_evictions += 1
            if self.record_events:
                self.evicted_events.append(block_hash)
            if self.on_evict is not None:
                self.on_evict(block_id, block_hash)

    def reset_cache(self) -> None:
        """Forget every cached block that nobody owns (blocks in use keep their index)."""
        for block_id in list(self._free):
            if self.block_hash[block_id] is not None:
                del self.cached[self.block_hash[block_id]]
                if self.record_events:
                    self.evicted_events.append(self.block_hash[block_id])
                self.block_hash[block_id] = None

    def take_events(self) -> tuple[list[BlockHash], list[BlockHash]]:
        """The hashes stored into and evicted from the index since the last call, in order."""
        events = self.stored_events, self.evicted_events
        self.stored_events, self.evicted_events = [], []
        return events

    def check_integrity(self) -> None:
        for block_id, refs in enumerate(self.ref_counts):
            assert refs >= 0, f"block {block_id} has negative refs"
            assert (refs == 0) == (block_id in self._free), f"block {block_id}: refs={refs}, free={block_id in self._free}"
        for block_hash, block_id in self.cached.items():
            assert self.block_hash[block_id] == block_hash, f"block {block_id} cached under a stale hash"
        assert sum(h is not None for h in self.block_hash) == len(self.cached)
