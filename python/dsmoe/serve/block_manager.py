"""Block manager of the paged latent cache: 64-token blocks, reference counts, and prefix caching.

A block id names one 64-token page in every layer's pool (``kv[layer][block]``). Blocks are free
(never filled or released without a hash), cached (a full block registered under the hash of its
token chain, kept after its last user leaves, evicted least recently used first) or in use
(``refcount > 0``; shared by every sequence whose prompt has the same prefix). Eviction only ever takes
blocks with refcount 0, so a block a sequence still reads is never handed to another."""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

__all__ = ["BlockManager", "BLOCK_SIZE"]

BLOCK_SIZE = 64


class BlockManager:
    def __init__(self, num_blocks: int, *, enable_prefix_caching: bool = True, model_id: str = "",
                 lookahead_token: bool = False):
        """``lookahead_token``: a full block's hash also covers the token after it (the MTP layer's cache
        entry at a position depends on the next token, so such a block is only reusable when that token
        matches too)."""
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"BlockManager: argument 'num_blocks' must be an int >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.model_id = model_id
        self.lookahead_token = lookahead_token
        self.refcount = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self._empty: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()   # cached blocks with refcount 0, oldest first
        self.num_evictions = 0

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (empty ones and evictable cached ones)."""
        return len(self._empty) + len(self._lru)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // BLOCK_SIZE)

    # ------------------------------------------------------------------ hashing
    def chain_hashes(self, tokens: list[int], num_full: int | None = None) -> list[bytes]:
        """Hash chain of the full blocks of ``tokens``: h_j = H(h_{j-1}, model id, block j's ids[, next id])."""
        n = len(tokens) // BLOCK_SIZE if num_full is None else num_full
        if self.lookahead_token:
            n = min(n, (len(tokens) - 1) // BLOCK_SIZE)
        out: list[bytes] = []
        for j in range(n):
            out.append(self.block_hash_of(tokens, j, out[-1] if out else None))
        return out

    def hashable_blocks(self, num_tokens: int) -> int:
        """Full blocks of a sequence of ``num_tokens`` tokens that have a hash (with ``lookahead_token``
        the token after a block must exist)."""
        return (num_tokens - 1) // BLOCK_SIZE if self.lookahead_token else num_tokens // BLOCK_SIZE

    def block_hash_of(self, tokens: list[int], j: int, prev: bytes | None) -> bytes:
        ids = tokens[j * BLOCK_SIZE: (j + 1) * BLOCK_SIZE + (1 if self.lookahead_token else 0)]
        head = self.model_id.encode() if prev is None else prev
        return hashlib.sha256(head + b"|" + ",".join(map(str, ids)).encode()).digest()

    def match_prefix(self, tokens: list[int], max_blocks: int) -> list[int]:
        """Cached blocks for the longest hashed prefix of ``tokens`` (at most ``max_blocks``); not acquired."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in self.chain_hashes(tokens, max_blocks):
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, num_new: int, reused: list[int] = ()) -> bool:
        """Whether ``num_new`` fresh blocks fit after taking the ``reused`` cached ones (an unreferenced
        cached block leaves the evictable set when reused)."""
        idle = sum(1 for b in reused if self.refcount[b] == 0)
        return num_new + idle <= self.num_free_blocks

    def acquire(self, block: int) -> None:
        if self.refcount[block] == 0:
            self._lru.pop(block, None)
        self.refcount[block] += 1

    def allocate(self) -> int:
        """One fresh block (refcount 1): an empty one, else the least recently used cached one."""
        if self._empty:
            b = self._empty.popleft()
        elif self._lru:
            b, _ = self._lru.popitem(last=False)
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = None
            self.num_evictions += 1
        else:
            raise RuntimeError("BlockManager.allocate: no free block (check can_allocate first)")
        assert self.refcount[b] == 0
        self.refcount[b] = 1
        return b

    def release(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"BlockManager.release: block {block} is not in use")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if self.block_hash[block] is not None:
                self._lru[block] = None            # most recently used at the end
            else:
                self._empty.append(block)

    def register(self, block: int, h: bytes) -> None:
        """Marks a full, computed block as the cached copy of hash ``h`` (first writer wins)."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None or h in self.cached:
            return
        self.block_hash[block] = h
        self.cached[h] = block

    def check_invariants(self, in_use: list[list[int]]) -> None:
        """Debug/test check: refcounts equal the number of holders; free, evictable and held blocks are
        disjoint and cover the pool."""
        count = [0] * self.num_blocks
        for blocks in in_use:
            for b in blocks:
                count[b] += 1
        assert count == self.refcount, "refcounts disagree with the sequences' block tables"
        empty, lru = set(self._empty), set(self._lru)
        held = {b for b in range(self.num_blocks) if count[b]}
        assert not (empty & lru) and not (empty & held) and not (lru & held), "a block is both free and in use"
        assert len(empty) + len(lru) + len(held) == self.num_blocks
        assert all(self.block_hash[b] is not None for b in lru)
        assert all(self.cached[self.block_hash[b]] == b for b in range(self.num_blocks) if self.block_hash[b] is not None)
