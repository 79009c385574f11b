"""`BlockManager`: hands out the KV cache's blocks to sequences (and shares cached prefixes).

The cache itself is allocated by `runtime.kv_cache`; every layer uses the same block ids
for a sequence, so the manager only counts blocks.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from runtime.engine.sequence import Sequence


class Block:
    """One physical KV block: how many sequences use it and, once full and computed, the
    chained hash of its tokens (prefix caching)."""

    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


class BlockManager:
    """Hands out KV cache blocks to sequences; with prefix caching, shares full blocks.

    A full block's hash chains the previous block's hash with its tokens, so equal hashes
    mean equal prefixes. Blocks are published in the prefix cache (`publish`) once the step
    that computes their K/V is scheduled; a freed block keeps its hash and stays reusable
    until it is evicted, least recently freed first. Free blocks live in an ordered dict
    (O(1) pop from the front and removal by id on a cache hit).

    Every sequence holding blocks also owns a row of `tables` (``[rows, width]`` int64,
    -1 padded) that mirrors its ``block_table`` as blocks come and go, so a step's block
    tables are one gather of rows (`rows_of`), not a copy of every sequence's list.
    ``width`` is the most blocks one sequence can hold (default: all of them).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        max_blocks_per_seq: int | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        width = min(num_blocks, max_blocks_per_seq or num_blocks)
        self.tables = np.full((16, width), -1, dtype=np.int64)  # [rows, width], grows
        self._free_rows = list(range(15, -1, -1))
        self._row_of: dict[int, int] = {}  # seq_id -> row of `tables`

    # -- block table rows
    def rows_of(self, seqs: list[Sequence]) -> np.ndarray:
        """``[B]`` rows of `tables` holding the block tables of `seqs` (which hold blocks)."""
        row_of = self._row_of
        return np.fromiter((row_of[s.seq_id] for s in seqs), dtype=np.int64, count=len(seqs))

    def _take_row(self, seq: Sequence) -> int:
        if not self._free_rows:
            rows = self.tables.shape[0]
            self.tables = np.concatenate([self.tables, np.full_like(self.tables, -1)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        row = self._row_of[seq.seq_id] = self._free_rows.pop()
        return row

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    # -- prefix cache
    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chained hashes of `seq`'s first `num_full_blocks` blocks (memoised on seq)."""
        hashes = seq.block_hashes
        # Only blocks whose token ids are all known (pending tokens are still on the device).
        num_full_blocks = min(num_full_blocks, len(seq.token_ids) // self.block_size)
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(seq.block_tokens(i)))))
        return hashes[:num_full_blocks]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding `seq`'s longest cached prefix of full blocks.

        The block of the last token is never taken from the cache: that token must be
        computed to produce logits, and computing it must not write into a shared block.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.hash_to_block_id.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def publish(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Offer `seq`'s full blocks among its first `num_computed_tokens` tokens for reuse.

        Called when the step computing those tokens is scheduled: each layer stores the
        step's K/V before any attention reads, so a sequence scheduled in the same step may
        already read them.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_published_blocks:
            return
        # A block holding a pending token is published by a later call, once its id is known.
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_published_blocks, len(hashes)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = hashes[i]
                # Equal content computed twice keeps the first copy as the cached one.
                self.hash_to_block_id.setdefault(hashes[i], block.block_id)
            assert block.hash == hashes[i], "a cached block changed content"
        seq.num_published_blocks = len(hashes)

    # -- allocation
    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} is still referenced"
        if block.hash is not None:  # evict it from the prefix cache
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _blocks_needed(self, seq: Sequence, hits: list[int]) -> int:
        # Cache hits on freed blocks come out of the free pool too.
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks - len(hits) + revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self._blocks_needed(seq, self._cached_prefix(seq)) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of `seq` (a waiting sequence); cached prefix blocks are
        shared and counted as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "sequence already has blocks"
        hits = self._cached_prefix(seq)
        assert self._blocks_needed(seq, hits) <= self.num_free_blocks, (
            "allocate without can_allocate"
        )
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
        seq.block_table = hits + [
            self._take_free_block() for _ in range(seq.num_blocks - len(hits))
        ]
        row = self._take_row(seq)  # first: it may grow (replace) `tables`
        self.tables[row, : len(seq.block_table)] = seq.block_table
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_published_blocks = len(hits)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the block table can grow to hold every token of `seq` (one new token)."""
        return seq.num_blocks - len(seq.block_table) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Grow `seq`'s block table to hold all its tokens (after a token was appended)."""
        assert seq.block_table, "append_slot on a sequence without blocks"
        table = seq.block_table
        while len(table) < seq.num_blocks:
            block_id = self._take_free_block()
            self.tables[self._row_of[seq.seq_id], len(table)] = block_id
            table.append(block_id)

    def grow(self, seq: Sequence) -> bool:
        """`append_slot` if `can_append`, in one call (the scheduler's per-sequence step);
        False, changing nothing, when too few blocks are free."""
        table = seq.block_table
        missing = (seq.num_tokens + self.block_size - 1) // self.block_size - len(table)
        if missing <= 0:
            return True
        if missing > len(self.free_block_ids):
            return False
        row = self._row_of[seq.seq_id]
        for _ in range(missing):
            block_id = self._take_free_block()
            self.tables[row, len(table)] = block_id
            table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Blocks whose last user left go back to the free pool;
        hashed ones at the back (reusable until evicted, tail blocks first), the rest at
        the front (nothing to keep)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        row = self._row_of.pop(seq.seq_id, None)
        if row is not None:
            self.tables[row, : len(seq.block_table)] = -1
            self._free_rows.append(row)
        seq.block_table = []
        seq.num_published_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (weights changed, or tests)."""
        self.hash_to_block_id.clear()
        for block in self.blocks:
            block.hash = None
