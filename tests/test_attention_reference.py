"""The torch reference backend (the oracle of every kernel test) against dense attention."""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    assert_close,
    attention_kwargs,
    batches,
    dense_attention,
    make_batch,
)
from hypothesis import given, settings

from runtime.attention import AttentionParams, PagedAttention
from runtime.attention.reference import (
    gather_sequence_kv,
    paged_attention_ref,
    reshape_and_cache_ref,
)


@settings(max_examples=60, deadline=None)
@given(batch=batches())
def test_reference_matches_dense_attention(batch):
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    out = paged_attention_ref(
        batch.query, batch.kv_cache, batch.metadata, **attention_kwargs(batch)
    )
    assert_close(out, dense_attention(batch), batch.query.dtype)


@settings(max_examples=30, deadline=None)
@given(batch=batches(dtypes=(torch.float32,), head_dims=(64,), v_head_dims=(None, 32, 96)))
def test_gather_returns_the_unpaged_sequence(batch):
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    for b, seq_len in enumerate(batch.metadata.host_seq_lens()):
        k, v = gather_sequence_kv(batch.kv_cache, batch.metadata.block_tables[b], seq_len, 64)
        torch.testing.assert_close(k, batch.full_keys[b], atol=0, rtol=0)
        torch.testing.assert_close(v, batch.full_values[b], atol=0, rtol=0)


def test_reference_cache_write_skips_negative_slots():
    batch = make_batch(
        [(0, 3)], num_heads=2, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float32
    )
    before = batch.kv_cache.clone()
    slots = batch.metadata.slot_mapping.clone()
    slots[1] = -1
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, slots)
    table = batch.metadata.block_tables[0].tolist()
    block, offset = divmod(int(batch.metadata.slot_mapping[1]), 4)
    assert block == table[0]
    assert torch.isnan(batch.kv_cache[:, block, offset]).all(), "slot -1 must not be written"
    for t in (0, 2):
        block, offset = divmod(int(slots[t]), 4)
        assert torch.equal(batch.kv_cache[0, block, offset], batch.key[t])
        assert torch.equal(batch.kv_cache[1, block, offset], batch.value[t])
    written = torch.isnan(before) & ~torch.isnan(batch.kv_cache)
    assert int(written.sum()) == 2 * 2 * 2 * 64  # two tokens, K and V, 2 heads x 64


def test_params_take_transformers_off_values_and_a_layer_rebuilds_them():
    params = AttentionParams(1, sliding_window=0, logits_soft_cap=-1.0)
    assert (params.scale, params.sliding_window, params.logits_soft_cap) == (1.0, None, None)
    assert AttentionParams(0.5, sliding_window=4096.0).sliding_window == 4096
    with pytest.raises(TypeError, match="alibi must be an Alibi"):
        AttentionParams(1.0, alibi=[0.5, 0.25])
    layer = PagedAttention(2, 64, 0.125, sliding_window=8)
    built = layer.params
    layer.sliding_window = None  # a test switching the window off on a built model
    assert layer.params is not built and layer.params.sliding_window is None
    assert layer.params.scale == 0.125 and "sliding_window=None" in repr(layer)
