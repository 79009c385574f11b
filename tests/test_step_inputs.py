"""Step inputs: `StepInputs.build` (the one builder) and the scheduler's `prepare_step`
against a per-token Python reference; the runner's device metadata carries host copies."""

from __future__ import annotations

from collections import OrderedDict

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from runtime.engine.block_manager import BlockManager
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.scheduler import SchedulerOutput
from runtime.engine.sequence import Sequence
from runtime.engine.step_inputs import StepInputs, dummy_prefill, prepare_step


def reference(tables, context_lens, query_lens, block_size):
    """Token by token: positions, cache slots, query starts, sequence lengths."""
    positions, slots, starts, seq_lens = [], [], [0], []
    for table, ctx, n in zip(tables, context_lens, query_lens):
        for pos in range(ctx, ctx + n):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + n)
        seq_lens.append(ctx + n)
    return positions, slots, starts, seq_lens


def check(inputs: StepInputs, tables, context_lens, query_lens, block_size) -> None:
    positions, slots, starts, seq_lens = reference(tables, context_lens, query_lens, block_size)
    assert inputs.positions.tolist() == positions
    assert inputs.slot_mapping.tolist() == slots
    assert inputs.query_start_loc.tolist() == starts
    assert inputs.seq_lens.tolist() == seq_lens
    width = inputs.block_tables.shape[1]
    assert inputs.block_tables.tolist() == [list(t) + [-1] * (width - len(t)) for t in tables]
    assert inputs.max_query_len == max(query_lens) and inputs.max_seq_len == max(seq_lens)
    assert inputs.num_prefill_tokens == sum(n for n in query_lens if n > 1)


@st.composite
def steps(draw):
    """A scheduled step over sequences whose blocks the block manager handed out in a
    shuffled physical order; some sequences end on a pending token (sampled by the step
    in flight, its id known on the device only)."""
    block_size = draw(st.integers(1, 5))
    num_seqs = draw(st.integers(1, 5))
    lens = [draw(st.integers(1, 20)) for _ in range(num_seqs)]
    num_blocks = sum(-(-n // block_size) for n in lens)
    bm = BlockManager(num_blocks, block_size)
    perm = draw(st.permutations(range(num_blocks)))
    bm.free_block_ids = OrderedDict.fromkeys(perm)
    out = SchedulerOutput()
    sampled_rows = {}
    free_rows = draw(st.permutations(range(8)))  # rows of the previous step's samples
    for i, n_tokens in enumerate(lens):
        tokens = draw(st.lists(st.integers(0, 99), min_size=n_tokens, max_size=n_tokens))
        pending = n_tokens > 1 and draw(st.booleans())
        seq = Sequence(i, tokens[:-1] if pending else tokens, SamplingParams(), block_size)
        seq.num_pending_tokens = int(pending)
        bm.allocate(seq)  # blocks for every token, as the scheduler's allocate gives
        computed = draw(st.integers(0, n_tokens - 1))
        n_new = draw(st.integers(1, n_tokens - computed))
        if pending:
            sampled_rows[i] = free_rows[i]
            seq.expected_pending = tokens[-1]
        out.seqs.append(seq)
        out.num_new_tokens.append(n_new)
        out.num_computed_tokens.append(computed)
        out.sample.append(computed + n_new == seq.num_tokens)
    return out, bm, sampled_rows


@settings(max_examples=60, deadline=None)
@given(steps())
def test_prepare_step_matches_the_reference(case) -> None:
    out, bm, sampled_rows = case
    block_size = bm.block_size
    inputs = prepare_step(out, bm, sampled_rows)
    ctx = out.num_computed_tokens
    # the table is cut to the blocks this step reaches
    tables = [
        s.block_table[: -(-(c + n) // block_size)]
        for s, c, n in zip(out.seqs, ctx, out.num_new_tokens)
    ]
    check(inputs, tables, ctx, out.num_new_tokens, block_size)
    starts = np.cumsum(out.num_new_tokens)
    assert inputs.logits_indices.tolist() == [
        int(starts[i]) - 1 for i, s in enumerate(out.sample) if s
    ]
    # Known ids on the host; a pending one is read from the previous step's samples.
    expected_ids, positions, rows = [], [], []
    for s, c, n in zip(out.seqs, ctx, out.num_new_tokens):
        tokens = s.token_ids + ([s.expected_pending] if s.num_pending_tokens else [])
        for pos in range(c, c + n):
            if pos >= len(s.token_ids):
                positions.append(len(expected_ids))
                rows.append(sampled_rows[s.seq_id])
            expected_ids.append(tokens[pos])
    assert inputs.sampled_positions.tolist() == positions
    assert inputs.sampled_rows.tolist() == rows
    host_ids = list(expected_ids)
    for p in positions:
        host_ids[p] = 0
    assert inputs.input_ids.tolist() == host_ids
    # On the device (here the CPU) the step's ids are whole again.
    sampled = torch.zeros(8, dtype=torch.int64)
    for s in out.seqs:
        if s.num_pending_tokens:
            sampled[sampled_rows[s.seq_id]] = s.expected_pending
    ids, _, md = inputs.to_device("cpu", sampled=sampled)
    assert ids.tolist() == expected_ids
    query = out.num_new_tokens
    if max(query) > 1 and min(query) == 1:
        assert md.decode_ids.tolist() == [b for b, n in enumerate(query) if n == 1]
        assert md.prefill_ids.tolist() == [b for b, n in enumerate(query) if n > 1]
    else:
        assert md.decode_ids is None and md.prefill_ids is None


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(1, 9), st.integers(0, 2)), min_size=1, max_size=5
    ),
    st.randoms(),
)
def test_build_matches_the_reference(block_size, shapes, rng) -> None:
    """Lists of any widths (spare blocks at the end of a table are allowed), shuffled ids."""
    widths = [-(-(c + n) // block_size) + spare for c, n, spare in shapes]
    ids = list(range(sum(widths)))
    rng.shuffle(ids)
    tables, start = [], 0
    for w in widths:
        tables.append(ids[start : start + w])
        start += w
    ctx, query = [c for c, _, _ in shapes], [n for _, n, _ in shapes]
    inputs = StepInputs.build(tables, ctx, query, block_size)
    check(inputs, tables, ctx, query, block_size)
    assert inputs.logits_indices.tolist() == [s - 1 for s in np.cumsum(query).tolist()]
    assert inputs.input_ids.tolist() == [0] * sum(query)


def test_build_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        StepInputs.build([[3]], [2], [3], 4)  # 5 tokens, one block of 4
    with pytest.raises(ValueError, match="-1 where this step stores"):
        StepInputs.build(np.array([[3, -1]]), [2], [3], 4)
    with pytest.raises(ValueError, match="input ids"):
        StepInputs.build([[3]], [0], [2], 4, input_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=">= 1 new token"):
        StepInputs.build([[3]], [0], [0], 4)


def test_dummy_prefill_fills_consecutive_blocks() -> None:
    inputs = dummy_prefill([5, 1, 9], 4)
    check(inputs, [[0, 1], [2], [3, 4, 5]], [0, 0, 0], [5, 1, 9], 4)
    assert inputs.logits_indices.tolist() == [4, 5, 14]


def test_runner_metadata_has_host_copies() -> None:
    from runtime.engine.model_runner import ModelRunner

    runner = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 4, 4, 1, 2)], torch.device("cpu"))
    ids, pos, md = runner.tensors(dummy_prefill([3, 2], 4))
    assert md.seq_lens_cpu == [3, 2] and md.query_lens_cpu == [3, 2]
    assert md.block_tables.dtype == torch.int32 and md.slot_mapping.dtype == torch.int64
    assert ids.tolist() == [0] * 5 and pos.tolist() == [0, 1, 2, 0, 1]
