"""Triton kernels (interpreter on CPU) against dense attention and the torch reference."""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    DEVICE,
    assert_close,
    attention_kwargs,
    batches,
    dense_attention,
    make_batch,
    run_triton,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.attention.triton_decode as triton_decode
from runtime.attention import Alibi, PagedAttention
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref
from runtime.attention.triton_config import DecodeConfig
from runtime.attention.triton_ops import reshape_and_cache
from runtime.engine.step_inputs import StepInputs


@settings(max_examples=30, deadline=None)
@given(
    batch=batches(),
    block_n=st.sampled_from([16, 32, 64]),
    num_splits=st.sampled_from([None, 1, 3]),
    merge=st.sampled_from(["reduce kernel", "fused", "fused, min 32"]),
)
def test_triton_matches_dense_and_reference(batch, block_n, num_splits, merge):
    config = DecodeConfig(
        block_n=block_n,
        max_fused_splits=0 if merge == "reduce kernel" else 8,
        min_split_tokens=32 if merge.endswith("32") else 0,
    )
    out = run_triton(batch, num_splits=num_splits, decode_config=config)
    dtype = batch.query.dtype
    assert_close(out, dense_attention(batch), dtype)
    ref = paged_attention_ref(
        batch.query, batch.kv_cache, batch.metadata, **attention_kwargs(batch)
    )
    assert_close(out, ref.float(), dtype)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_every_head_dim_mixed_batch(head_dim):
    # A fresh prompt, a chunk after cached context and two decodes in one batch.
    batch = make_batch(
        [(0, 9), (21, 5), (30, 1), (3, 1)],
        num_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=4, dtype=torch.float32,
    )  # fmt: skip
    # Queries as a column slice of a fused QKV projection: token rows strided.
    num_tokens, width = batch.query.shape[0], 4 * head_dim
    fused = torch.randn(num_tokens, 2 * width)  # [T, (Hq + 2 Hkv) * D]
    fused[:, :width] = batch.query.reshape(num_tokens, width)
    batch.query = fused[:, :width].view(num_tokens, 4, head_dim)  # [T, Hq, D], stride 2*width
    assert not batch.query.is_contiguous()
    assert_close(run_triton(batch, num_splits=2), dense_attention(batch), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_only_batch_with_more_splits_than_blocks(dtype, window):
    # All sequences decode: the graph-capturable path (no host lists). 8 splits of 16
    # tokens leave the later splits of short sequences empty.
    batch = make_batch(
        [(40, 1), (0, 1), (7, 1)],
        num_heads=8, num_kv_heads=2, head_dim=64, block_size=2, dtype=dtype,
        sliding_window=window, alibi=True, logits_soft_cap=20.0,
    )  # fmt: skip
    batch.metadata.query_lens_cpu = None  # any host-list read would now sync
    out = run_triton(batch, num_splits=8, decode_config=DecodeConfig(block_n=16))
    assert_close(out, dense_attention(batch), dtype)


@pytest.mark.parametrize("min_split", [0, 16, 48])
def test_fused_merge_leaves_counters_zero_and_repeats_exactly(min_split):
    # Sequences of 1..40 keys over 4 splits of >= min_split tokens: some use one split
    # (written directly), others 2..4 (merged by the last to finish). The counters must
    # be zero again after each launch, or the next launch would merge too early.
    batch = make_batch(
        [(n, 1) for n in (0, 7, 15, 16, 31, 39)],
        num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float32,
    )  # fmt: skip
    config = DecodeConfig(block_n=16, max_fused_splits=4, min_split_tokens=min_split)
    first = run_triton(batch, num_splits=4, decode_config=config)
    assert not triton_decode.split_counters(first.device, 1).any()
    assert_close(first, dense_attention(batch), torch.float32)
    assert torch.equal(run_triton(batch, num_splits=4, decode_config=config), first)


def test_a_miscounted_merge_gives_wrong_results():
    # Sensitivity of the test above: a counter left non-zero (as a launch that did not
    # reset its pairs would leave it) makes a split merge before the others finished.
    batch = make_batch(
        [(39, 1)], num_heads=2, num_kv_heads=1, head_dim=64, block_size=4, dtype=torch.float32
    )
    config = DecodeConfig(block_n=16, max_fused_splits=4, min_split_tokens=0)
    expected = dense_attention(batch)
    out = run_triton(batch, num_splits=4, decode_config=config)
    assert_close(out, expected, torch.float32)
    counters = triton_decode.split_counters(out.device, 1)
    counters[0] = 1
    try:
        out = run_triton(batch, num_splits=4, decode_config=config)
        # the early merge reads results not yet written: wrong values, or NaN from the
        # uninitialised buffer (a NaN difference is never > 1e-3, so compare as a whole)
        assert not torch.allclose(out.float().cpu(), expected.float().cpu(), atol=1e-3, rtol=0)
    finally:
        counters.zero_()


def test_default_split_heuristic_runs_split_and_unsplit():
    for shapes in ([(50, 1)], [(5, 1)] * 4):
        batch = make_batch(
            shapes, num_heads=2, num_kv_heads=1, head_dim=64, block_size=8, dtype=torch.float32
        )
        assert_close(run_triton(batch), dense_attention(batch), torch.float32)


@settings(max_examples=15, deadline=None)
@given(
    num_tokens=st.integers(1, 12),
    block_size=st.sampled_from([1, 4, 16]),
    cache_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_reshape_and_cache_matches_reference(num_tokens, block_size, cache_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads, head_dim, num_blocks = 2, 80, 12
    # K and V as column slices of one fused projection output: rows are strided.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen)  # [T, 3*Hkv*D]
    key = qkv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]  # [T] distinct
    slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    expected = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    actual = expected.to(DEVICE)
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key.to(DEVICE), value.to(DEVICE), actual, slots.to(DEVICE))
    actual = actual.cpu()
    # The interpreter casts fp32 -> bf16 by truncation, the GPU (and torch) round to
    # nearest: allow that one bf16 ulp; every other cast must be exact.
    rtol = 2.0**-7 if cache_dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(actual, expected, atol=0, rtol=rtol)
    assert torch.equal(actual == 0, expected == 0), "written slots differ"


def test_reshape_and_cache_skips_negative_slots():
    key = torch.randn(3, 1, 64, device=DEVICE)
    value = torch.randn(3, 1, 64, device=DEVICE)
    cache = torch.full((2, 2, 4, 1, 64), float("nan"), device=DEVICE)
    reshape_and_cache(key, value, cache, torch.tensor([5, -1, 0], device=DEVICE))
    assert torch.equal(cache[0, 1, 1], key[0]) and torch.equal(cache[1, 0, 0], value[2])
    assert int((~torch.isnan(cache)).sum()) == 2 * 2 * 64  # only tokens 0 and 2, K and V


def test_paged_attention_module_triton_backend(monkeypatch):
    """Prompt, then a chunk, then decodes of two sequences through `PagedAttention`,
    Triton against the torch backend on identical caches."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 64, 4
    layer = PagedAttention(
        heads, head_dim, scale=0.125, num_kv_heads=kv_heads, sliding_window=6,
        alibi=Alibi([0.1, 0.2, 0.3, 0.4]), logits_soft_cap=30.0,
    ).to(DEVICE)  # fmt: skip
    caches = {
        name: torch.zeros(2, 8, block_size, kv_heads, head_dim, device=DEVICE)
        for name in ("torch", "triton")
    }
    tables = [[3, 0, 6], [5, 1, 7]]
    steps = [([0, 0], [7, 3]), ([7, 3], [2, 4]), ([9, 7], [1, 1]), ([10, 8], [1, 1])]
    for context, new in steps:
        metadata = StepInputs.build(tables, context, new, block_size).to_device(DEVICE).metadata
        q = torch.randn(sum(new), heads * head_dim, device=DEVICE)  # [T, Hq*D]
        k = torch.randn(sum(new), kv_heads * head_dim, device=DEVICE)  # [T, Hkv*D]
        v = torch.randn(sum(new), kv_heads * head_dim, device=DEVICE)  # [T, Hkv*D]
        outs = {}
        for backend, cache in caches.items():
            monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", backend)
            outs[backend] = layer(q, k, v, cache, metadata)  # [T, Hq*D]
        assert outs["triton"].shape == (sum(new), heads * head_dim)
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=0)
        torch.testing.assert_close(caches["triton"], caches["torch"], atol=0, rtol=0)
