"""Merging split-KV decode's partial outputs by their log2-sum-exp weights:
`merge_head_splits` for one (sequence, query head), and the second kernel that runs it
for each (`triton_decode.paged_decode` launches it when the context was cut into more
splits than the decode kernel merges itself, which calls the same helper)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_head_splits(
    part_out_ptr,  # [B, Hq, NUM_SPLITS, Dv] fp32
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32
    row,  # int64 row of (sequence, query head, split 0)
    num_splits,  # splits holding results: the first num_splits rows from `row`
    HEAD_DIM: tl.constexpr,  # the value head size Dv
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= num_splits, a power of two
    CACHE: tl.constexpr,  # load cache modifier ("" or ".cg": past L1)
):
    """One query head's output [BLOCK_D] fp32: its splits' normalised outputs weighted by
    exp2(lse). Split 0 holds the first visible key of any non-empty sequence, so the max
    is finite; the guards only keep an empty sequence at 0 instead of NaN."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(
        part_lse_ptr + row + offs_s, mask=s_mask, other=float("-inf"), cache_modifier=CACHE
    )  # [BLOCK_S]
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_S]
    parts = tl.load(
        part_out_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
        cache_modifier=CACHE,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    return tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)


@triton.jit
def decode_reduce_kernel(
    out_ptr,  # [T, Hq, Dv]
    part_out_ptr,  # [B, Hq, NUM_SPLITS, Dv] fp32
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_ids_ptr,  # [B] int32 (read only if HAS_SEQ_IDS)
    stride_ot,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # the value head size Dv
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of two
    HAS_SEQ_IDS: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq = b
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + b)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    row = (b * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS
    o = merge_head_splits(
        part_out_ptr, part_lse_ptr, row, NUM_SPLITS, HEAD_DIM, BLOCK_D, BLOCK_S, ""
    )  # [BLOCK_D]
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(
        out_ptr + token * stride_ot + head * HEAD_DIM + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
