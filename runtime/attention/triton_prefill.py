"""Varlen prefill / chunked prefill over the paged cache.

A sequence with ``L`` tokens in total of which ``Q`` are new has its new tokens' K/V
already stored (by `reshape_and_cache`); query ``i`` sits at position ``L - Q + i`` and
attends causally to every cached key up to itself (from the first one a sliding window
or its attention chunk leaves), so a fresh prompt (``L == Q``) and a chunk after cached
context take the same path. One program per (query tile, query head, sequence); keys
every row of the tile sees (before the tile's first query, and not below any row's
window or chunk start) skip the mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.kv_layout import split_kv_cache, value_offset
from runtime.attention.triton_common import (
    dot_precision,
    first_visible_key,
    mma,
    online_softmax_step,
    scores_log2,
    softmax_init,
)
from runtime.attention.triton_config import PrefillConfig, kernel_target, prefill_config


@triton.jit
def _prefill_inner(
    acc,  # [BLOCK_M, BLOCK_D] fp32
    l_i,  # [BLOCK_M] fp32
    m_i,  # [BLOCK_M] fp32
    q,  # [BLOCK_M, BLOCK_D]
    q_pos,  # [BLOCK_M] int32
    key_lo,  # [BLOCK_M] int32 first key each row sees (window / chunk; else unused)
    slopes,  # [BLOCK_M] fp32
    bt_row,  # [max_blocks] int32 block table of this sequence
    cache_ptr,  # key view [num_blocks, BLOCK_SIZE, Hkv, D] (runtime.attention.kv_layout)
    value_offset,
    kv_row,  # [BLOCK_D] offsets of this KV head's key features within a token
    d_mask,  # [BLOCK_D] bool
    v_row,  # [BLOCK_DV] offsets of its value features
    dv_mask,  # [BLOCK_DV] bool
    lo,
    hi,
    scale,
    soft_cap,
    alibi_scale,
    STRIDE_TOKEN: tl.constexpr,  # cache elements per token
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # apply the causal / window / chunk mask (the diagonal band)
    EVEN: tl.constexpr,  # every tile full and both head sizes powers of two: no predicates
    HAS_WINDOW: tl.constexpr,  # with HAS_CHUNK: mask keys below key_lo
    HAS_CHUNK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    offs_n = lo + tl.arange(0, BLOCK_N)
    pages = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=offs_n < hi, other=0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        tok_off = (
            pages.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        ) * STRIDE_TOKEN  # [BLOCK_N]
        # Prefetch the next tile's block ids so the K/V loads below can be pipelined.
        next_n = offs_n + BLOCK_N
        pages = tl.load(bt_row + next_n // BLOCK_SIZE, mask=next_n < hi, other=0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_ptrs = cache_ptr + tok_off[:, None] + kv_row[None, :]  # [BLOCK_N, BLOCK_D]
        if EVEN:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        qk = mma(q, tl.trans(k), DOT_PREC)  # [BLOCK_M, BLOCK_N]
        s = scores_log2(
            qk, q_pos, offs_n, slopes, scale, soft_cap, alibi_scale, HAS_SOFTCAP, HAS_ALIBI
        )
        if MASKED:
            visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW or HAS_CHUNK:
                visible = visible & (offs_n[None, :] >= key_lo[:, None])
            s = tl.where(visible, s, float("-inf"))
        v_ptrs = cache_ptr + value_offset + tok_off[:, None] + v_row[None, :]  # [BLOCK_N, BLOCK_DV]
        if EVEN:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_PREC)
    return acc, l_i, m_i


# The block-table row stride is the widest table of the step, which changes every few
# steps: left unspecialised, it costs no recompilation (Triton otherwise compiles a
# variant for multiples of 16 and one for the rest).
@triton.jit(do_not_specialize=["stride_bt"])
def paged_prefill_kernel(
    out_ptr,  # [T, Hq, Dv]
    query_ptr,  # [T, Hq, D], rows stride_qt apart
    cache_ptr,  # key view [num_blocks, BLOCK_SIZE, Hkv, D] (runtime.attention.kv_layout)
    block_tables_ptr,  # [num_seqs, max_blocks] int32, -1 padded
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_ids_ptr,  # [P] int32 sequences handled here (read only if HAS_SEQ_IDS)
    alibi_ptr,  # [Hq] fp32 (read only if HAS_ALIBI)
    sinks_ptr,  # [Hq] fp32 (read only if HAS_SINKS)
    scale,
    soft_cap,
    window,
    chunk,  # attention chunk size (read only if HAS_CHUNK)
    alibi_scale,
    stride_qt,
    stride_ot,
    stride_bt,
    value_offset,  # elements from a token-head's key to its value
    G: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # HEAD_DIM_V padded to a power of two
    STRIDE_TOKEN: tl.constexpr,  # cache elements per token
    STRIDE_HEAD: tl.constexpr,  # cache elements per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SEQ_IDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,  # 0 none, 1 relative, 2 bf16-rounded absolute (scores_log2)
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Highest query tiles (the most keys under a causal mask) are scheduled first.
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    m_start = m_tile * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first = seq_len - q_len + m_start  # position of this tile's first query

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = seq_len - q_len + offs_m  # [BLOCK_M]
    rows = (q_start + offs_m).to(tl.int64)  # [BLOCK_M] token index of each query row
    q = tl.load(
        query_ptr + rows[:, None] * stride_qt + head * HEAD_DIM + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slopes = slopes + tl.load(alibi_ptr + head)

    hi = tl.minimum(seq_len, first + BLOCK_M)
    # Keys in [lo, full_lo) and [full_end, hi) are masked, [full_lo, full_end) are seen by
    # every row of the tile: before its first query and not below its last row's bound.
    key_lo = q_pos
    if HAS_WINDOW or HAS_CHUNK:
        key_lo = first_visible_key(q_pos, window, chunk, HAS_WINDOW, HAS_CHUNK)  # [BLOCK_M]
        lo = (first_visible_key(first, window, chunk, HAS_WINDOW, HAS_CHUNK) // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        # The window's band moves with every row: masked throughout.
        full_lo = lo
        full_end = lo
    elif HAS_CHUNK:
        # Rows of one tile may fall in two chunks: whole tiles from the last row's chunk
        # start up to the first query are every row's.
        last_start = ((hi - 1) // chunk) * chunk
        full_lo = tl.minimum(tl.maximum(tl.cdiv(last_start, BLOCK_N) * BLOCK_N, lo), hi)
        full_end = tl.maximum(((first + 1) // BLOCK_N) * BLOCK_N, full_lo)
    else:
        lo = 0
        full_lo = 0
        full_end = ((first + 1) // BLOCK_N) * BLOCK_N

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_row = (head // G) * STRIDE_HEAD + offs_d  # [BLOCK_D]
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V
    v_row = (head // G) * STRIDE_HEAD + offs_dv  # [BLOCK_DV]
    heads = tl.zeros([BLOCK_M], dtype=tl.int32) + head
    m_i, l_i = softmax_init(sinks_ptr, heads, m_mask, True, HAS_SINKS)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_CHUNK:
        acc, l_i, m_i = _prefill_inner(
            acc, l_i, m_i, q, q_pos, key_lo, slopes, bt_row, cache_ptr, value_offset, kv_row,
            d_mask, v_row, dv_mask, lo, full_lo, scale, soft_cap, alibi_scale,
            STRIDE_TOKEN, BLOCK_SIZE, BLOCK_N, True, False,
            HAS_WINDOW, HAS_CHUNK, HAS_ALIBI, HAS_SOFTCAP, DOT_PREC,
        )  # fmt: skip
    acc, l_i, m_i = _prefill_inner(
        acc, l_i, m_i, q, q_pos, key_lo, slopes, bt_row, cache_ptr, value_offset, kv_row,
        d_mask, v_row, dv_mask, full_lo, full_end, scale, soft_cap, alibi_scale,
        STRIDE_TOKEN, BLOCK_SIZE, BLOCK_N, False, (HEAD_DIM == BLOCK_D) & (HEAD_DIM_V == BLOCK_DV),
        HAS_WINDOW, HAS_CHUNK, HAS_ALIBI, HAS_SOFTCAP, DOT_PREC,
    )  # fmt: skip
    acc, l_i, m_i = _prefill_inner(
        acc, l_i, m_i, q, q_pos, key_lo, slopes, bt_row, cache_ptr, value_offset, kv_row,
        d_mask, v_row, dv_mask, full_end, hi, scale, soft_cap, alibi_scale,
        STRIDE_TOKEN, BLOCK_SIZE, BLOCK_N, True, False,
        HAS_WINDOW, HAS_CHUNK, HAS_ALIBI, HAS_SOFTCAP, DOT_PREC,
    )  # fmt: skip
    # Every valid row sees at least its own key, so l_i > 0 where stored.
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * HEAD_DIM_V + offs_dv[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def paged_prefill(
    out: torch.Tensor,  # [T, Hq, Dv], written at the prefill tokens' rows
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W] (runtime.attention.kv_layout)
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_ids: torch.Tensor | None,  # [P] int32 sequences to handle here; None = all
    max_query_len: int,  # host int: the longest query among seq_ids
    *,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,  # [Hq] fp32
    logits_soft_cap: float | None,
    sinks: torch.Tensor | None = None,  # [Hq] fp32
    config: PrefillConfig | None = None,
    alibi_scale: float = 1.0,
    alibi_bf16: bool = False,
    attention_chunk_size: int | None = None,
) -> None:
    """Causal attention of every new token of ``seq_ids`` over its sequence's cache."""
    num_prefill = seq_lens.shape[0] if seq_ids is None else seq_ids.shape[0]
    if num_prefill == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    key_cache, value_cache = split_kv_cache(kv_cache, head_dim)
    v_head_dim = value_cache.shape[-1]
    assert block_tables.dtype == seq_lens.dtype == query_start_loc.dtype == torch.int32
    assert seq_ids is None or seq_ids.dtype == torch.int32
    assert block_tables.stride(1) == 1
    assert out.is_contiguous() and out.shape == (*query.shape[:2], v_head_dim)
    target = kernel_target(query.device)
    config = config or prefill_config(head_dim, v_head_dim, query.dtype, target)
    grid = (triton.cdiv(max_query_len, config.block_m), num_heads, num_prefill)
    paged_prefill_kernel[grid](
        out_ptr=out,
        query_ptr=query,
        cache_ptr=key_cache,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        seq_ids_ptr=seq_ids if seq_ids is not None else seq_lens,
        alibi_ptr=alibi_slopes if alibi_slopes is not None else seq_lens,
        sinks_ptr=sinks if sinks is not None else seq_lens,
        scale=scale,
        soft_cap=logits_soft_cap or 0.0,
        window=sliding_window or 0,
        chunk=attention_chunk_size or 0,
        alibi_scale=float(alibi_scale),
        stride_qt=query.stride(0),
        stride_ot=out.stride(0),
        stride_bt=block_tables.stride(0),
        value_offset=value_offset(key_cache, value_cache),
        G=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        HEAD_DIM_V=v_head_dim,
        BLOCK_DV=triton.next_power_of_2(v_head_dim),
        STRIDE_TOKEN=key_cache.stride(1),
        STRIDE_HEAD=key_cache.stride(2),
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        HAS_SEQ_IDS=seq_ids is not None,
        HAS_WINDOW=sliding_window is not None,
        HAS_CHUNK=attention_chunk_size is not None,
        HAS_ALIBI=0 if alibi_slopes is None else 2 if alibi_bf16 else 1,
        HAS_SOFTCAP=logits_soft_cap is not None,
        HAS_SINKS=sinks is not None,
        DOT_PREC=dot_precision(kv_cache.dtype, kv_cache.device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
