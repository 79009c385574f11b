"""Model runner: `prepare_step`'s numpy flattening equals `InputMetadata.build` on random
scheduler outputs, and the device metadata carries the host copies."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis import given, settings

from runtime.attention.metadata import InputMetadata
from runtime.engine.model_runner import dummy_prefill_inputs, prepare_step
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.scheduler import SchedulerOutput
from runtime.engine.sequence import Sequence


@st.composite
def steps(draw):
    block_size = draw(st.integers(1, 5))
    out = SchedulerOutput()
    next_block = 0
    for i in range(draw(st.integers(1, 5))):
        n_tokens = draw(st.integers(1, 20))
        seq = Sequence(i, draw(st.lists(st.integers(0, 99), min_size=n_tokens, max_size=n_tokens)),
                       SamplingParams(), block_size)  # fmt: skip
        seq.num_computed_tokens = draw(st.integers(0, n_tokens - 1))
        n_new = draw(st.integers(1, n_tokens - seq.num_computed_tokens))
        # Blocks for every token (as allocate gives), in shuffled physical order.
        seq.block_table = [next_block + j for j in range(seq.num_blocks)]
        next_block += seq.num_blocks
        out.seqs.append(seq)
        out.num_new_tokens.append(n_new)
        out.sample.append(seq.num_computed_tokens + n_new == seq.num_tokens)
    perm = draw(st.permutations(range(next_block)))
    for seq in out.seqs:
        seq.block_table = [perm[b] for b in seq.block_table]
    return out, block_size


@settings(max_examples=60, deadline=None)
@given(steps())
def test_prepare_step_matches_input_metadata_build(case) -> None:
    out, block_size = case
    inputs = prepare_step(out, block_size)
    ctx = [s.num_computed_tokens for s in out.seqs]
    starts = np.concatenate([[0], np.cumsum(out.num_new_tokens)])
    logits = [int(starts[i + 1]) - 1 for i, s in enumerate(out.sample) if s]
    tables = [
        s.block_table[: -(-(c + n) // block_size)]
        for s, c, n in zip(out.seqs, ctx, out.num_new_tokens)
    ]
    ref = InputMetadata.build(tables, ctx, out.num_new_tokens, block_size, logits_indices=logits)
    assert inputs.slot_mapping.tolist() == ref.slot_mapping.tolist()
    assert inputs.query_start_loc.tolist() == ref.query_start_loc.tolist()
    assert inputs.seq_lens.tolist() == ref.seq_lens.tolist()
    assert inputs.block_tables.tolist() == ref.block_tables.tolist()
    assert inputs.logits_indices.tolist() == ref.logits_indices.tolist()
    assert (inputs.max_query_len, inputs.max_seq_len, inputs.num_prefill_tokens) == (
        ref.max_query_len, ref.max_seq_len, ref.num_prefill_tokens,
    )  # fmt: skip
    expected_ids, expected_pos = [], []
    for s, c, n in zip(out.seqs, ctx, out.num_new_tokens):
        expected_ids += s.token_ids[c : c + n]
        expected_pos += list(range(c, c + n))
    assert inputs.input_ids.tolist() == expected_ids
    assert inputs.positions.tolist() == expected_pos


def test_dummy_prefill_inputs_are_consistent() -> None:
    inputs = dummy_prefill_inputs([5, 1, 9], 4)
    tables = [[0, 1], [2], [3, 4, 5]]
    ref = InputMetadata.build(tables, [0, 0, 0], [5, 1, 9], 4)
    assert inputs.slot_mapping.tolist() == ref.slot_mapping.tolist()
    assert inputs.block_tables.tolist() == ref.block_tables.tolist()
    assert inputs.logits_indices.tolist() == ref.logits_indices.tolist()


def test_runner_metadata_has_host_copies() -> None:
    from runtime.engine.model_runner import ModelRunner

    runner = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 4, 4, 1, 2)], torch.device("cpu"))
    ids, pos, md = runner.build(dummy_prefill_inputs([3, 2], 4))
    assert md.seq_lens_cpu == [3, 2] and md.query_lens_cpu == [3, 2]
    assert md.block_tables.dtype == torch.int32 and md.slot_mapping.dtype == torch.int64
    assert ids.tolist() == [0] * 5 and pos.tolist() == [0, 1, 2, 0, 1]
