"""A value head size that differs from the query/key one (MLA: ``v_head_dim``): the
unpadded ``[1, blocks, block_size, Hkv, D + Dv]`` cache, both backends, the layer."""

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
from hypothesis import strategies as st
from test_attention_triton import DEVICE, run_triton

from runtime.attention import PagedAttention
from runtime.attention.kv_layout import kv_cache_shape, split_kv_cache
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref
from runtime.attention.triton_config import DecodeConfig
from runtime.attention.triton_ops import reshape_and_cache
from runtime.engine.step_inputs import StepInputs


def test_layout_holds_keys_then_values_without_padding():
    assert kv_cache_shape(5, 4, 2, 64, 64) == (2, 5, 4, 2, 64)
    assert kv_cache_shape(5, 4, 2, 96, 64) == (1, 5, 4, 2, 160)
    cache = torch.arange(float(3 * 160)).reshape(1, 1, 1, 3, 160)
    key_cache, value_cache = split_kv_cache(cache, 96)
    assert key_cache.shape == (1, 1, 3, 96) and value_cache.shape == (1, 1, 3, 64)
    assert value_cache[0, 0, 1, 0] == 160 + 96  # head 1's value follows head 1's key
    with pytest.raises(ValueError, match="no value features"):
        split_kv_cache(cache, 160)


@settings(max_examples=25, deadline=None)
@given(
    batch=batches(head_dims=(64, 96, 192), v_head_dims=(32, 48, 128)),
    block_n=st.sampled_from([16, 64]),
    num_splits=st.sampled_from([None, 1, 3]),
)
def test_triton_and_reference_match_dense_with_other_value_dim(batch, block_n, num_splits):
    reference_cache = batch.kv_cache.clone()
    out = run_triton(batch, num_splits=num_splits, decode_config=DecodeConfig(block_n=block_n))
    dtype = batch.query.dtype
    expected = dense_attention(batch)  # [T, Hq, Dv]
    assert out.shape == expected.shape
    assert_close(out, expected, dtype)
    reshape_and_cache_ref(batch.key, batch.value, reference_cache, batch.metadata.slot_mapping)
    ref = paged_attention_ref(
        batch.query, reference_cache, batch.metadata, **attention_kwargs(batch)
    )
    assert_close(ref, expected, dtype)
    # Both backends write every new K and V to the same cache elements.
    same = torch.isnan(reference_cache) == torch.isnan(batch.kv_cache)
    assert same.all()


@pytest.mark.parametrize("head_dim, v_head_dim", [(96, 64), (64, 128), (80, 48)])
def test_mixed_batch_with_splits(head_dim, v_head_dim):
    batch = make_batch(
        [(0, 9), (21, 5), (30, 1), (3, 1)],
        num_heads=4, num_kv_heads=2, head_dim=head_dim, v_head_dim=v_head_dim,
        block_size=4, dtype=torch.float32, sliding_window=12,
    )  # fmt: skip
    assert_close(run_triton(batch, num_splits=2), dense_attention(batch), torch.float32)


def test_reshape_and_cache_interleaves_key_and_value_per_head():
    num_tokens, heads, dim, v_dim = 5, 2, 24, 16
    key = torch.randn(num_tokens, heads, dim)
    value = torch.randn(num_tokens, heads, v_dim)
    slots = torch.tensor([7, -1, 0, 12, 3])
    expected = torch.full(kv_cache_shape(4, 4, heads, dim, v_dim), float("nan"))
    reshape_and_cache_ref(key, value, expected, slots)
    actual = torch.full_like(expected, float("nan")).to(DEVICE)
    reshape_and_cache(key.to(DEVICE), value.to(DEVICE), actual, slots.to(DEVICE))
    torch.testing.assert_close(actual.cpu(), expected, atol=0, rtol=0, equal_nan=True)
    block, offset = divmod(12, 4)
    assert torch.equal(expected[0, block, offset, 1, dim:], value[3, 1])
    assert int((~torch.isnan(expected)).sum()) == 4 * heads * (dim + v_dim)  # slot -1 skipped


def test_layer_returns_value_dim_heads_on_both_backends(monkeypatch):
    torch.manual_seed(0)
    heads, dim, v_dim, block_size = 4, 96, 64, 4
    layer = PagedAttention(heads, dim, scale=dim**-0.5, v_head_dim=v_dim).to(DEVICE)
    assert "v_head_dim=64" in repr(layer)
    caches = {
        b: torch.zeros(layer.kv_cache_shape(8, block_size), device=DEVICE)
        for b in ("torch", "triton")
    }
    tables = [[3, 0, 6], [5, 1, 7]]
    for context, new in [([0, 0], [7, 3]), ([7, 3], [2, 4]), ([9, 7], [1, 1])]:
        metadata = StepInputs.build(tables, context, new, block_size).to_device(DEVICE).metadata
        # As MLA builds them: q head-major ([H, T, D] transposed back), v a slice of a
        # per-head [nope | v] projection. Neither is token-major contiguous.
        q = torch.randn(heads, sum(new), dim, device=DEVICE).transpose(0, 1)  # [T, Hq, D]
        k = torch.randn(sum(new), heads * dim, device=DEVICE)  # [T, Hkv*D]
        kv = torch.randn(sum(new), heads, 32 + v_dim, device=DEVICE)  # [T, Hkv, nope + Dv]
        v = kv[..., 32:]  # [T, Hkv, Dv]
        outs = {}
        for backend, cache in caches.items():
            monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", backend)
            outs[backend] = layer(q, k, v, cache, metadata)  # [T, Hq*Dv]
        assert outs["torch"].shape == (sum(new), heads * v_dim)
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="does not hold"):
        layer(q, k, v, torch.zeros(2, 8, block_size, heads, dim, device=DEVICE), metadata)
