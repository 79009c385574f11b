"""BlockManager: allocation, append, free and prefix sharing never double-assign a slot."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtime.engine.block_manager import BlockManager
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.sequence import Sequence

PARAMS = SamplingParams(max_tokens=1000)


def make_seq(i: int, tokens: list[int], block_size: int) -> Sequence:
    return Sequence(i, tokens, PARAMS, block_size)


def check_block_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    """Reference counts equal table membership; blocks a sequence still writes (positions
    from its computed count on) belong to it alone; shared blocks hold equal prefixes."""
    owners: dict[int, list[tuple[Sequence, int]]] = {}
    for seq in live:
        assert len(seq.block_table) >= seq.num_blocks - 1
        assert len(set(seq.block_table)) == len(seq.block_table), "block twice in one table"
        for idx, b in enumerate(seq.block_table):
            owners.setdefault(b, []).append((seq, idx))
    for block in bm.blocks:
        users = owners.get(block.block_id, [])
        assert block.ref_count == len(users), f"block {block.block_id} refcount"
        assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)
    for b, users in owners.items():
        if len(users) == 1:
            continue
        seq0, idx0 = users[0]
        for seq, idx in users:
            assert idx == idx0, "shared block at different positions"
            end = (idx + 1) * bm.block_size
            assert seq.token_ids[:end] == seq0.token_ids[:end], "shared block, different prefix"
            # Nobody writes into a shared block.
            assert seq.num_computed_tokens >= end, f"{seq} would write shared block {b}"
    for h, b in bm.hash_to_block_id.items():
        assert bm.blocks[b].hash == h
    # The rows of `tables` mirror the live block tables; every other entry is -1.
    rows = bm.rows_of(live).tolist() if live else []
    assert len(set(rows)) == len(rows)
    for seq, row in zip(live, rows):
        width = len(seq.block_table)
        assert bm.tables[row, :width].tolist() == seq.block_table
        assert (bm.tables[row, width:] == -1).all()
    assert (np.delete(bm.tables, rows, axis=0) == -1).all()


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.live: list[Sequence] = []
        self.next_id = 0

    @precondition(lambda self: self.bm is None)
    @rule(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4), caching=st.booleans())
    def init(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)

    @precondition(lambda self: self.bm is not None)
    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=12))
    def allocate(self, tokens: list[int]) -> None:
        seq = make_seq(self.next_id, tokens, self.bm.block_size)
        self.next_id += 1
        free_before = self.bm.num_free_blocks
        if not self.bm.can_allocate(seq):
            return
        self.bm.allocate(seq)
        assert len(seq.block_table) == seq.num_blocks
        assert seq.num_computed_tokens < seq.num_tokens, "the last token is always computed"
        assert self.bm.num_free_blocks <= free_before
        self.live.append(seq)

    @precondition(lambda self: self.bm is not None and self.live)
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """A step computed some of a sequence's tokens; its full blocks become shareable."""
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_uncomputed_tokens == 0:
            return
        n = data.draw(st.integers(1, seq.num_uncomputed_tokens))
        self.bm.publish(seq, seq.num_computed_tokens + n)
        seq.num_computed_tokens += n

    @precondition(lambda self: self.bm is not None and self.live)
    @rule(data=st.data(), token=st.integers(0, 1))
    def append(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from([s for s in self.live]))
        if seq.num_uncomputed_tokens != 0:
            return
        seq.append_token(token)
        if self.bm.can_append(seq):
            self.bm.append_slot(seq)
            assert len(seq.block_table) == seq.num_blocks
        else:
            seq.token_ids.pop()  # out of blocks: a scheduler would preempt instead

    @precondition(lambda self: self.bm is not None and self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == []

    @invariant()
    def blocks_consistent(self) -> None:
        if self.bm is not None:
            check_block_invariants(self.bm, self.live)

    def teardown(self) -> None:
        if self.bm is None:
            return
        for seq in self.live:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_prefix_sharing_reuses_blocks_and_keeps_last_token_uncached() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3, 4, 5], 2)
    bm.allocate(a)
    bm.publish(a, 5)
    a.num_computed_tokens = 5
    b = make_seq(1, [1, 2, 3, 4, 9], 2)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 4
    assert b.block_table[2] != a.block_table[2]
    # Same prompt exactly: the block of the last token is recomputed, not shared.
    c = make_seq(2, [1, 2, 3, 4], 2)
    bm.allocate(c)
    assert c.num_computed_tokens == 2 and c.block_table[0] == a.block_table[0]
    assert c.block_table[1] != a.block_table[1]
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 8
    # Freed blocks stay cached until evicted.
    d = make_seq(3, [1, 2, 3, 4, 7, 7], 2)
    bm.allocate(d)
    assert d.num_cached_tokens == 4
    bm.free(d)
    assert bm.num_free_blocks == 8


def test_eviction_drops_hash_and_ref_count_is_checked() -> None:
    bm = BlockManager(2, 2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3], 2)
    bm.allocate(a)
    bm.publish(a, 3)
    bm.free(a)
    b = make_seq(1, [5, 6, 7, 8], 2)  # needs both blocks: evicts a's cached block
    bm.allocate(b)
    assert bm.hash_to_block_id == {}
    bm.free(b)
    bm.blocks[0].ref_count = 1  # corrupt: a free block still referenced
    with pytest.raises(AssertionError):
        for _ in range(2):
            bm._take_free_block()


def test_can_append_needs_a_block_only_at_block_boundary() -> None:
    bm = BlockManager(2, 2)
    s = make_seq(0, [1, 2], 2)
    bm.allocate(s)
    s.num_computed_tokens = 2
    s.append_token(3)
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 0
    s.num_computed_tokens = 3
    s.append_token(4)
    assert bm.can_append(s)  # fits the second block
    s.append_token(5)
    assert not bm.can_append(s)
    bm.free(s)
    assert bm.num_free_blocks == 2


def test_table_rows_grow_and_are_reused() -> None:
    """More sequences than the first rows of `tables`: it grows; freed rows come back."""
    bm = BlockManager(200, 2)
    seqs = [make_seq(i, [i % 7] * (1 + i % 5), 2) for i in range(40)]
    for seq in seqs:
        bm.allocate(seq)
    check_block_invariants(bm, seqs)
    assert bm.tables.shape[0] >= 40
    for seq in seqs[::2]:
        bm.free(seq)
    live = seqs[1::2]
    check_block_invariants(bm, live)
    for seq in live[:5]:
        seq.append_token(1)
        seq.append_token(1)
        bm.append_slot(seq)
    again = [make_seq(100 + i, [3, 4, 5], 2) for i in range(20)]
    rows = bm.tables.shape[0]
    for seq in again:
        bm.allocate(seq)
    assert bm.tables.shape[0] == rows, "freed rows were reused"
    check_block_invariants(bm, live + again)
