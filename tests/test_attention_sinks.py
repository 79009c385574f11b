"""Attention sinks (``sinks``: one fp32 logit per query head in every softmax
denominator, gpt-oss's / granite_swa's ``s_aux``): reference and Triton (interpreter on
CPU) against the dense oracle, over prefill, chunked prefill and split-KV decode."""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    assert_close,
    attention_kwargs,
    batches,
    dense_attention,
    make_batch,
    to_device,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.attention import PagedAttention
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref
from runtime.attention.triton_config import DecodeConfig
from runtime.attention.triton_ops import paged_attention, reshape_and_cache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference(batch):
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    return paged_attention_ref(
        batch.query, batch.kv_cache, batch.metadata, **attention_kwargs(batch)
    )


@settings(max_examples=12, deadline=None)
@given(batch=batches(sinks=(True,)), num_splits=st.sampled_from([None, 1, 3]))
def test_sinks_triton_and_reference_match_dense(batch, num_splits):
    moved = to_device(batch, DEVICE)
    reshape_and_cache(moved.key, moved.value, moved.kv_cache, moved.metadata.slot_mapping)
    out = paged_attention(
        moved.query, moved.kv_cache, moved.metadata, **attention_kwargs(moved),
        num_splits=num_splits, decode_config=DecodeConfig(block_n=16),
    )  # fmt: skip
    expected = dense_attention(batch)
    assert_close(out, expected, batch.query.dtype)
    assert_close(_reference(batch), expected, batch.query.dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_sinks_take_their_share(num_splits):
    # A large sink takes almost all probability mass (outputs -> 0); a very negative one
    # none (outputs = no-sink attention). Prefill, chunk and two decodes in one batch.
    shapes = [(0, 6), (9, 3), (20, 1), (3, 1)]
    batch = make_batch(
        shapes, num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float32
    )
    plain = dense_attention(batch)
    for logit, expected in ((40.0, torch.zeros_like(plain)), (-80.0, plain)):
        batch.sinks = torch.full((4,), logit)
        assert_close(dense_attention(batch), expected, torch.float32)
        moved = to_device(batch, DEVICE)
        reshape_and_cache(moved.key, moved.value, moved.kv_cache, moved.metadata.slot_mapping)
        out = paged_attention(
            moved.query, moved.kv_cache, moved.metadata, **attention_kwargs(moved),
            num_splits=num_splits,
        )  # fmt: skip
        assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_takes_sinks_per_call(monkeypatch, backend):
    """`PagedAttention(...)(q, k, v, cache, md, sinks=p)`: a bf16 parameter is used in fp32."""
    monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", backend)
    batch = make_batch(
        [(0, 5), (7, 1)], num_heads=4, num_kv_heads=1, head_dim=64, block_size=8,
        dtype=torch.float32, sinks=True,
    )  # fmt: skip
    layer = PagedAttention(4, 64, batch.scale, num_kv_heads=1)
    sinks = torch.nn.Parameter(batch.sinks.to(torch.bfloat16))
    batch.sinks = sinks.detach().float()
    moved = to_device(batch, DEVICE)
    out = layer.to(DEVICE)(
        moved.query.flatten(1),
        moved.key.flatten(1),
        moved.value.flatten(1),
        moved.kv_cache,
        moved.metadata,
        sinks=sinks.to(DEVICE),
    )  # [T, Hq*D]
    assert_close(out.unflatten(1, (4, 64)), dense_attention(batch), torch.float32)
