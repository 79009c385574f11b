"""ALiBi as transformers' Falcon builds it (``Alibi(dtype=torch.bfloat16)``): the bias is
``bf16(bf16(slope) * bf16(j)) * scale`` at absolute key position j, so slopes that are
not exact in bfloat16 (Falcon-RW's 32 or 71 heads) and positions past 256 round as
transformers rounds them. Reference and Triton (interpreter on CPU) against a dense
oracle over prefill, a chunk over long cached context and decodes."""

from __future__ import annotations

import pytest
import torch
from attention_cases import assert_close, make_batch, to_device

from runtime.attention import Alibi, AttentionParams, PagedAttention
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref
from runtime.attention.triton_ops import paged_attention, reshape_and_cache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = 0.3  # Falcon: the 1/sqrt(head_dim) its (q·kᵀ + alibi) gets


def _dense(batch) -> torch.Tensor:  # [T, Hq, D]
    outs = []
    starts = batch.metadata.query_start_loc.tolist()
    slopes = batch.alibi_slopes.to(torch.bfloat16)  # as Falcon's `slopes.bfloat16()`
    for b, (k, v) in enumerate(zip(batch.full_keys, batch.full_values)):
        q = batch.query[starts[b] : starts[b + 1]].float().transpose(0, 1)  # [Hq, Q, D]
        group = q.shape[0] // k.shape[1]
        kk = k.float().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        vv = v.float().repeat_interleave(group, 1).transpose(0, 1)
        length, num_q = k.shape[0], q.shape[1]
        positions = torch.arange(length)
        bias = (slopes[:, None] * positions[None, :]).float()  # bf16 x int64 -> bf16: [Hq, L]
        s = q @ kk.transpose(1, 2) * batch.scale + bias[:, None, :] * SCALE
        visible = positions[None, :] <= torch.arange(length - num_q, length)[:, None]
        s = s.masked_fill(~visible, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vv).transpose(0, 1))
    return torch.cat(outs)


def _batch():
    # 8 heads; slopes made inexact in bf16; contexts past 256 so positions round too
    batch = make_batch(
        [(0, 7), (290, 5), (300, 1), (280, 1)], num_heads=8, num_kv_heads=2, head_dim=16,
        block_size=16, dtype=torch.float32, alibi=True,
    )  # fmt: skip
    batch.alibi_slopes = batch.alibi_slopes * 1.37 + 0.011
    return batch


def _params(slopes: torch.Tensor, scale: float, dtype=torch.bfloat16) -> AttentionParams:
    """Scores scaled by `scale`; the bias built in `dtype`, then multiplied by SCALE."""
    return AttentionParams(scale, alibi=Alibi(slopes, scale=SCALE, dtype=dtype))


def test_bf16_alibi_reference_and_triton_match_dense():
    batch = _batch()
    expected = _dense(batch)
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    params = _params(batch.alibi_slopes, batch.scale)
    ref = paged_attention_ref(batch.query, batch.kv_cache, batch.metadata, params)
    assert_close(ref, expected, torch.float32)
    moved = to_device(batch, DEVICE)
    reshape_and_cache(moved.key, moved.value, moved.kv_cache, moved.metadata.slot_mapping)
    params = _params(moved.alibi_slopes, batch.scale)
    out = paged_attention(moved.query, moved.kv_cache, moved.metadata, params)
    assert_close(out, expected, torch.float32)
    # the rounding matters here: the plain relative bias is measurably different
    plain = _params(batch.alibi_slopes, batch.scale, dtype=torch.float32)
    plain_out = paged_attention_ref(batch.query, batch.kv_cache, batch.metadata, plain)
    assert (plain_out - expected).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_passes_bf16_alibi(monkeypatch, backend):
    monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", backend)
    batch = _batch()
    alibi = Alibi(batch.alibi_slopes, scale=SCALE, dtype=torch.bfloat16)
    layer = PagedAttention(8, 16, batch.scale, num_kv_heads=2, alibi=alibi)
    moved = to_device(batch, DEVICE)
    # a module cast to bf16 moves the slopes but keeps them fp32 (no buffer to round)
    layer.to(torch.bfloat16).to(DEVICE)
    assert layer.alibi.slopes.dtype == torch.float32
    assert layer.alibi.slopes.device.type == DEVICE.type
    out = layer(
        moved.query.flatten(1), moved.key.flatten(1), moved.value.flatten(1),
        moved.kv_cache, moved.metadata,
    )  # fmt: skip
    assert_close(out.unflatten(1, (8, 16)), _dense(batch), torch.float32)


def test_alibi_dtypes_are_the_kernels():
    with pytest.raises(ValueError, match="float16"):
        Alibi([0.5, 0.25], dtype=torch.float16)
    with pytest.raises(ValueError, match="3 ALiBi slopes for 4 heads"):
        PagedAttention(4, 16, 1.0, alibi=Alibi([0.5, 0.25, 0.125]))
