"""Pieces shared by the Triton prefill and decode kernels: score modifiers and the
online-softmax step, so both kernels apply exactly `paged_attention_ref`'s semantics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.kv_layout import split_kv_cache

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow and runs in the
    # interpreter as well as on every GPU backend (no libdevice call).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bfloat16 (ties to even), as fp32; bit arithmetic, so the CPU
    interpreter rounds exactly as the GPU and torch's ``.to(torch.bfloat16)``."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def scores_log2(
    qk,  # [M, N] fp32 raw q.k
    q_pos,  # [M] int32 absolute position of each query row
    k_pos,  # [N] int32 absolute position of each key column
    slopes,  # [M] fp32 ALiBi slope of each row (unused without HAS_ALIBI)
    scale,
    soft_cap,
    alibi_scale,  # fp32 factor on the ALiBi bias
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,  # 0 none, 1 slope * (j - i), 2 bf16(slope * bf16(j)) (Falcon)
):
    """Scores in log2 units: (softcap(qk * scale) + alibi * alibi_scale) * log2(e);
    callers mask."""
    if HAS_SOFTCAP or HAS_ALIBI:
        s = qk * scale
        if HAS_SOFTCAP:
            s = _tanh(s / soft_cap) * soft_cap
        if HAS_ALIBI == 1:
            rel = (k_pos[None, :] - q_pos[:, None]).to(tl.float32)  # [M, N]
            s = s + slopes[:, None] * rel * alibi_scale
        elif HAS_ALIBI == 2:
            # transformers' Falcon builds slope * position in bfloat16, at the absolute key
            # position (the per-row constant of the relative form would round differently)
            pos = _round_bf16(k_pos.to(tl.float32))  # [N]
            s = s + _round_bf16(_round_bf16(slopes)[:, None] * pos[None, :]) * alibi_scale
        s = s * LOG2E
    else:
        # One multiply on the hot path when no modifier is active.
        s = qk * (scale * LOG2E)
    return s


@triton.jit
def first_visible_key(
    q_pos,  # int32 absolute query position(s): a scalar or a [M] vector
    window,
    chunk,
    HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
):
    """The lowest key position ``q_pos`` sees: ``q_pos - window + 1`` under a sliding
    window, its chunk's start ``(q_pos // chunk) * chunk`` under chunk-local attention,
    the later of the two with both (callers mask keys below it and skip blocks wholly
    below the lowest row's)."""
    lo = q_pos * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_pos - window + 1)
    if HAS_CHUNK:
        lo = tl.maximum(lo, (q_pos // chunk) * chunk)
    return lo


@triton.jit
def softmax_init(
    sinks_ptr,  # [Hq] fp32 attention-sink logits (read only if HAS_SINKS)
    heads,  # [M] int32 query head of each row
    mask,  # [M] bool rows to read
    with_sink,  # scalar bool: this program's rows count the sink
    HAS_SINKS: tl.constexpr,
):
    """Running (max, denominator) before any key: (-inf, 0), or with an attention sink
    (sink * log2(e), 1), i.e. exp(sink) already in the denominator with no value."""
    m_i = tl.full(heads.shape, float("-inf"), dtype=tl.float32)
    l_i = tl.zeros(heads.shape, dtype=tl.float32)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=mask, other=0.0) * LOG2E
        m_i = tl.where(with_sink, sink, m_i)
        l_i = tl.where(with_sink, 1.0, l_i)
    return m_i, l_i


@triton.jit
def online_softmax_step(
    acc,  # [M, BLOCK_D] fp32 running numerator
    l_i,  # [M] fp32 running denominator
    m_i,  # [M] fp32 running max (log2 units)
    s,  # [M, N] fp32 scores in log2 units, -inf where hidden
    v,  # [N, BLOCK_D] values
    DOT_PREC: tl.constexpr,
):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead
    # keeps exp2(-inf - -inf) = NaN out of it.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)  # [M]
    p = tl.exp2(s - m_safe[:, None])  # [M, N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation; see `dot_precision` for ``DOT_PREC``."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The ``DOT_PREC`` constant of the kernels.

    fp32 tensor-core dots default to TF32 on GPU; fp32 caches ask for exact ("ieee")
    products. The CPU interpreter multiplies bf16 as raw uint16 bits, so there the
    operands (already bf16-rounded) are widened to fp32 first ("upcast"): same values,
    products exact as on tensor cores.
    """
    if dtype == torch.float32:
        return "ieee"
    if device.type != "cuda" and dtype == torch.bfloat16:
        return "upcast"
    return "tf32"


def check_attention_args(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W] (runtime.attention.kv_layout)
    alibi_slopes: torch.Tensor | None,  # [Hq] fp32
    sinks: torch.Tensor | None = None,  # [Hq] fp32
) -> None:
    """Assert the layout every attention kernel's address math relies on."""
    assert query.dim() == 3, f"query must be [T, Hq, D], got {tuple(query.shape)}"
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    split_kv_cache(kv_cache, head_dim)  # raises unless the cache holds keys of head_dim
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.stride(2) == 1 and query.stride(1) == head_dim, "query heads must be contiguous"
    assert query.dtype == kv_cache.dtype, (query.dtype, kv_cache.dtype)
    assert query.dtype in (torch.float32, torch.float16, torch.bfloat16), query.dtype
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (num_heads,) and alibi_slopes.dtype == torch.float32
        assert alibi_slopes.is_contiguous() and alibi_slopes.device == query.device
    if sinks is not None:
        assert sinks.shape == (num_heads,) and sinks.dtype == torch.float32, sinks.shape
        assert sinks.is_contiguous() and sinks.device == query.device
