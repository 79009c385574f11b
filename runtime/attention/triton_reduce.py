"""The split-KV decode's second kernel: merges each (sequence, query head)'s per-split
partial outputs by their log2-sum-exp weights (`triton_decode.paged_decode` launches it
when the context was cut into several splits)."""

from __future__ import annotations

import triton
import triton.language as tl


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
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    row = (b * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + offs_s, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    # Split 0 holds the first visible key of any non-empty sequence, so the max is
    # finite; the guards only keep an empty sequence at 0 instead of NaN.
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_S]
    parts = tl.load(
        part_out_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + token * stride_ot + head * HEAD_DIM + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )
