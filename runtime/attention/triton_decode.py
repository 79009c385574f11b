"""Split-KV (flash-decoding) paged decode: one new token per sequence.

One program per (sequence, KV head, split) handles all G query heads of that KV head
with `tl.dot` (G padded to >= 16 rows), so every K/V byte is read once. Splits cut the
context so that a few long sequences still fill the GPU; the launch fixes their count
from the batch shape (a CUDA graph stays valid as sequences grow). One split writes the
output directly. Several are merged by log-sum-exp, in one of two ways:

- up to ``DecodeConfig.max_fused_splits``: in this kernel. The last split of a
  (sequence, KV head) to finish merges them: each counts itself on a per-pair counter
  (an atomic add after its partial results are stored) and the one that completes the
  count reads the others' results. A sequence uses only the splits that hold at least
  ``min_split_tokens`` tokens, so a short one is not cut at all. No second kernel runs,
  which matters where a whole decode takes ~20 µs.
- more: by `triton_reduce.decode_reduce_kernel`, one program per query head, which
  merges many splits faster than one program could.

`shared/notes/paged-decode-spike.md` measured why each choice matters.
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
from runtime.attention.triton_config import (
    DecodeConfig,
    block_g,
    choose_num_splits,
    decode_config,
    decode_stages,
    kernel_target,
)
from runtime.attention.triton_reduce import decode_reduce_kernel, merge_head_splits


# The block-table row stride is the widest table of the step, which changes every few
# steps: left unspecialised, it costs no recompilation (Triton otherwise compiles a
# variant for multiples of 16 and one for the rest).
@triton.jit(do_not_specialize=["stride_bt"])
def paged_decode_kernel(
    out_ptr,  # [T, Hq, Dv] output
    part_out_ptr,  # [B, Hq, NUM_SPLITS, Dv] fp32 per-split normalised outputs
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32 per-split log2-sum-exp
    counters_ptr,  # [>= B * NUM_KV_HEADS] int32, zero: splits of each pair finished
    query_ptr,  # [T, Hq, D], rows stride_qt apart
    cache_ptr,  # key view [num_blocks, BLOCK_SIZE, Hkv, D] (runtime.attention.kv_layout)
    block_tables_ptr,  # [num_seqs, max_blocks] int32, -1 padded
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_ids_ptr,  # [B] int32 which sequences decode (read only if HAS_SEQ_IDS)
    alibi_ptr,  # [Hq] fp32 (read only if HAS_ALIBI)
    sinks_ptr,  # [Hq] fp32 (read only if HAS_SINKS)
    scale,
    soft_cap,
    window,
    chunk,  # attention chunk size (read only if HAS_CHUNK)
    alibi_scale,
    min_split,  # fewest tokens per split (a multiple of BLOCK_N)
    stride_qt,
    stride_ot,
    stride_bt,
    value_offset,  # elements from a token-head's key to its value
    NUM_KV_HEADS: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # G padded to a power of two >= 16 (tl.dot minimum)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # HEAD_DIM_V padded to a power of two
    STRIDE_TOKEN: tl.constexpr,  # cache elements per token
    STRIDE_HEAD: tl.constexpr,  # cache elements per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    NUM_SPLITS: tl.constexpr,  # the most splits of one sequence (grid axis 2)
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of two
    FUSED_MERGE: tl.constexpr,  # merge here (else the reduce kernel does)
    HAS_SEQ_IDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = b
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + b)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos = seq_len - 1

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * G + offs_g  # [BLOCK_G]
    q = tl.load(
        query_ptr + token * stride_qt + heads[:, None] * HEAD_DIM + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    slopes = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=g_mask, other=0.0)

    # This split's share of the visible keys (from the first one a sliding window or the
    # query's attention chunk leaves); starts stay BLOCK_N-aligned so a tile covers whole
    # cache blocks when BLOCK_N is a multiple of BLOCK_SIZE.
    lo = 0
    key_lo = 0
    if HAS_WINDOW or HAS_CHUNK:
        key_lo = first_visible_key(q_pos, window, chunk, HAS_WINDOW, HAS_CHUNK)
        lo = (key_lo // BLOCK_N) * BLOCK_N
    # Splits past the last that holds keys (short sequences) have nothing to do.
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    if FUSED_MERGE:
        per_split = tl.maximum(per_split, min_split)
    num_active = tl.cdiv(seq_len - lo, per_split)  # 1..NUM_SPLITS
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_row = kv_head * STRIDE_HEAD + offs_d  # [BLOCK_D]
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < HEAD_DIM_V
    v_row = kv_head * STRIDE_HEAD + offs_dv  # [BLOCK_DV]
    # The sink joins split 0's denominator (never empty then); the reduce weighs it in.
    m_i, l_i = softmax_init(sinks_ptr, heads, g_mask, split == 0, HAS_SINKS)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    q_pos_g = tl.zeros([BLOCK_G], dtype=tl.int32) + q_pos

    offs_n = start + tl.arange(0, BLOCK_N)
    pages = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=offs_n < end, other=0)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        tok_off = (
            pages.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        ) * STRIDE_TOKEN  # [BLOCK_N]
        # Next chunk's block ids now: K/V addresses that depend on a block-table load in
        # the same iteration stop Triton from pipelining the K/V loads.
        next_n = offs_n + BLOCK_N
        pages = tl.load(bt_row + next_n // BLOCK_SIZE, mask=next_n < end, other=0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + tok_off[:, None] + kv_row[None, :], mask=kv_mask, other=0.0)
        qk = mma(q, tl.trans(k), DOT_PREC)  # [BLOCK_G, BLOCK_N]
        visible = n_mask
        if HAS_WINDOW or HAS_CHUNK:
            visible = visible & (offs_n >= key_lo)
        s = scores_log2(
            qk, q_pos_g, offs_n, slopes, scale, soft_cap, alibi_scale, HAS_SOFTCAP, HAS_ALIBI
        )
        s = tl.where(visible[None, :], s, float("-inf"))
        v = tl.load(
            cache_ptr + value_offset + tok_off[:, None] + v_row[None, :],
            mask=n_mask[:, None] & dv_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_PREC)

    out_mask = g_mask[:, None] & dv_mask[None, :]
    o_ptrs = out_ptr + token * stride_ot + heads[:, None] * HEAD_DIM_V + offs_dv[None, :]
    # Results of a split: normalised output and log2-sum-exp, (0, -inf) for one that saw
    # no key (an empty split of the reduce kernel's path, or a padding row).
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row = (b * (NUM_KV_HEADS * G) + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_G]
    part_ptrs = part_out_ptr + row[:, None] * HEAD_DIM_V + offs_dv[None, :]
    if NUM_SPLITS == 1:
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif not FUSED_MERGE:
        tl.store(part_ptrs, o, mask=out_mask)
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
    elif num_active == 1:
        if split == 0:
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif split < num_active:
        tl.store(part_ptrs, o, mask=out_mask)
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        # Every thread's stores are done (barrier), then published at GPU scope with the
        # count (release); the last split acquires them all.
        tl.debug_barrier()
        pair = b * NUM_KV_HEADS + kv_head
        finished = tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel", scope="gpu")
        if finished == num_active - 1:
            tl.atomic_xchg(counters_ptr + pair, 0, sem="relaxed", scope="gpu")  # next launch
            first_row = (b * (NUM_KV_HEADS * G) + kv_head * G).to(tl.int64) * NUM_SPLITS
            out_row = out_ptr + token * stride_ot + kv_head * G * HEAD_DIM_V
            for g in tl.static_range(G):
                # past L1, which may hold another launch's results at these addresses
                o_g = merge_head_splits(
                    part_out_ptr, part_lse_ptr, first_row + g * NUM_SPLITS, num_active,
                    HEAD_DIM_V, BLOCK_DV, BLOCK_S, ".cg",
                )  # fmt: skip
                tl.store(
                    out_row + g * HEAD_DIM_V + offs_dv,
                    o_g.to(out_ptr.dtype.element_ty),
                    mask=dv_mask,
                )


# Per device: the split counters every decode launch shares (one stream per device runs
# them, one launch at a time), and the buffers they outgrew, which CUDA graphs captured
# earlier may still point at.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []
MIN_COUNTERS = 1 << 16  # (sequence, KV head) pairs: 512 sequences x 128 KV heads


def split_counters(device: torch.device, pairs: int) -> torch.Tensor:
    """Zeroed int32 counters for ``pairs`` (sequence, KV head) pairs. Each decode launch
    leaves them zero again (the merging split resets its pair's), so one buffer serves
    every launch on the device. It is allocated eagerly: a CUDA graph capture can record
    a fill but not run it, so one that needs a larger buffer than exists stops with an
    error (the engine decodes eagerly at its largest batch before it captures)."""
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= pairs:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"paged decode: a CUDA graph capture needs split counters for {pairs} "
            "(sequence, KV head) pairs, more than any eager call allocated; run one "
            "eager decode of this batch size before capturing"
        )
    if buf is not None:
        _OUTGROWN.append(buf)
    buf = torch.zeros(max(pairs, MIN_COUNTERS), dtype=torch.int32, device=device)
    _COUNTERS[device] = buf
    return buf


def paged_decode(
    out: torch.Tensor,  # [T, Hq, Dv], written at the decode tokens' rows
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W] (runtime.attention.kv_layout)
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_ids: torch.Tensor | None,  # [B] int32 decode sequences; None = every sequence
    *,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,  # [Hq] fp32
    logits_soft_cap: float | None,
    sinks: torch.Tensor | None = None,  # [Hq] fp32
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    alibi_scale: float = 1.0,
    alibi_bf16: bool = False,
    attention_chunk_size: int | None = None,
) -> None:
    """Decode attention for sequences with exactly one new token (the last of each).

    No host synchronisation happens here: the grid comes from tensor shapes and host
    ints only, so the call is CUDA-graph capturable (benchmarks/attention.py captures
    it). A capture holds fixed, and replays need unchanged: the number of decode
    sequences (pad with slot -1 / seq_len 1 rows), ``block_tables.shape`` and the
    tensors' addresses, the kernel constants (head layout, dtype, block size,
    window/chunk/ALiBi/soft-cap/sinks presence) and the split count and stage count, which
    `choose_num_splits` / `decode_stages` derive from the batch shape and device alone,
    never from sequence lengths, so one graph stays right and fast as sequences grow.
    Any split count gives the same result; it only changes speed.
    """
    num_seqs_total = seq_lens.shape[0]
    num_decode = num_seqs_total if seq_ids is None else seq_ids.shape[0]
    if num_decode == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    key_cache, value_cache = split_kv_cache(kv_cache, head_dim)
    v_head_dim = value_cache.shape[-1]
    target = kernel_target(query.device)
    config = config or decode_config(head_dim, v_head_dim, query.dtype, group, target)
    assert block_tables.dtype == seq_lens.dtype == query_start_loc.dtype == torch.int32
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert out.is_contiguous() and out.shape == (*query.shape[:2], v_head_dim)
    if num_splits is None:
        num_splits = choose_num_splits(num_decode, num_kv_heads, query.device, config)
    assert num_splits >= 1
    block_dv = triton.next_power_of_2(v_head_dim)
    part_out = part_lse = out  # unused placeholders when the kernel writes out directly
    fused_merge = num_splits <= config.max_fused_splits
    counters = seq_lens  # unused placeholder unless the kernel merges splits itself
    if num_splits > 1 and fused_merge:
        counters = split_counters(query.device, num_decode * num_kv_heads)
    if num_splits > 1:
        part_out = torch.empty(
            (num_decode, num_heads, num_splits, v_head_dim),
            dtype=torch.float32,
            device=query.device,
        )
        part_lse = torch.empty(
            (num_decode, num_heads, num_splits), dtype=torch.float32, device=query.device
        )
    ids = seq_ids if seq_ids is not None else seq_lens  # placeholder pointer when unused
    paged_decode_kernel[(num_decode, num_kv_heads, num_splits)](
        out_ptr=out,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        counters_ptr=counters,
        query_ptr=query,
        cache_ptr=key_cache,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        seq_ids_ptr=ids,
        alibi_ptr=alibi_slopes if alibi_slopes is not None else seq_lens,
        sinks_ptr=sinks if sinks is not None else seq_lens,
        scale=scale,
        soft_cap=logits_soft_cap or 0.0,
        window=sliding_window or 0,
        chunk=attention_chunk_size or 0,
        alibi_scale=float(alibi_scale),
        min_split=triton.cdiv(config.min_split_tokens, config.block_n) * config.block_n,
        stride_qt=query.stride(0),
        stride_ot=out.stride(0),
        stride_bt=block_tables.stride(0),
        value_offset=value_offset(key_cache, value_cache),
        NUM_KV_HEADS=num_kv_heads,
        G=group,
        BLOCK_G=block_g(group),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        HEAD_DIM_V=v_head_dim,
        BLOCK_DV=block_dv,
        STRIDE_TOKEN=key_cache.stride(1),
        STRIDE_HEAD=key_cache.stride(2),
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        FUSED_MERGE=fused_merge,
        HAS_SEQ_IDS=seq_ids is not None,
        HAS_WINDOW=sliding_window is not None,
        HAS_CHUNK=attention_chunk_size is not None,
        HAS_ALIBI=0 if alibi_slopes is None else 2 if alibi_bf16 else 1,
        HAS_SOFTCAP=logits_soft_cap is not None,
        HAS_SINKS=sinks is not None,
        DOT_PREC=dot_precision(kv_cache.dtype, kv_cache.device),
        num_warps=config.num_warps,
        num_stages=decode_stages(num_decode * num_kv_heads * num_splits, query.device, config),
    )
    if num_splits > 1 and not fused_merge:
        decode_reduce_kernel[(num_decode, num_heads)](
            out_ptr=out,
            part_out_ptr=part_out,
            part_lse_ptr=part_lse,
            query_start_loc_ptr=query_start_loc,
            seq_ids_ptr=ids,
            stride_ot=out.stride(0),
            NUM_HEADS=num_heads,
            HEAD_DIM=v_head_dim,
            BLOCK_D=block_dv,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            HAS_SEQ_IDS=seq_ids is not None,
            num_warps=4,
        )
