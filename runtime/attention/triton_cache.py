"""`reshape_and_cache`: store this step's K/V into the paged cache by slot (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.attention.kv_layout import split_kv_cache, value_offset


@triton.jit
def _store_rows(
    src_ptr,  # this token's [Hkv, DIM] row, contiguous
    dst_ptr,  # the slot's first head: [Hkv, DIM] heads STRIDE_HEAD apart
    offs,  # [BLOCK] element offsets within the token's Hkv * DIM features
    mask,  # [BLOCK] bool
    DIM: tl.constexpr,
    STRIDE_HEAD: tl.constexpr,
):
    x = tl.load(src_ptr + offs, mask=mask)
    if STRIDE_HEAD == DIM:  # heads adjacent in the cache: one contiguous row
        dst = dst_ptr + offs
    else:  # K and V of a head interleaved (v_head_dim != head_dim)
        dst = dst_ptr + (offs // DIM) * STRIDE_HEAD + offs % DIM
    tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def reshape_and_cache_kernel(
    key_ptr,  # [T, Hkv, D], rows stride_kt apart, (Hkv, D) contiguous
    value_ptr,  # [T, Hkv, Dv], rows stride_vt apart, (Hkv, Dv) contiguous
    cache_ptr,  # key view [num_blocks, block_size, Hkv, D] (runtime.attention.kv_layout)
    slot_mapping_ptr,  # [T] int64, < 0 = skip
    stride_kt,
    stride_vt,
    value_offset,  # elements from a token-head's key to its value
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    STRIDE_TOKEN: tl.constexpr,  # cache elements per token (slot)
    STRIDE_HEAD: tl.constexpr,  # cache elements per KV head
    ROW: tl.constexpr,  # Hkv * D key elements per token
    ROW_V: tl.constexpr,  # Hkv * Dv value elements per token
    BLOCK: tl.constexpr,  # power of two: the chunk of a row one program copies
):
    token = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    # Padding tokens of CUDA-graph batches carry slot -1: an empty row limit masks all
    # their loads and stores (one comparison; the interpreter also mis-types `&` of a
    # vector with a scalar bool).
    row = token.to(tl.int64)
    # int64 address math: num_blocks * block_size * Hkv * D passes 2**31 on large caches.
    dst = cache_ptr + slot * STRIDE_TOKEN
    mask = offs < tl.where(slot >= 0, ROW, 0)
    _store_rows(key_ptr + row * stride_kt, dst, offs, mask, HEAD_DIM, STRIDE_HEAD)
    mask_v = offs < tl.where(slot >= 0, ROW_V, 0)
    _store_rows(
        value_ptr + row * stride_vt, dst + value_offset, offs, mask_v, HEAD_DIM_V, STRIDE_HEAD
    )


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, Dv]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W] (runtime.attention.kv_layout)
    slot_mapping: torch.Tensor,  # [T] int64, < 0 = skip
) -> None:
    """Write ``key[t]``/``value[t]`` to cache slot ``slot_mapping[t]`` (block * block_size +
    offset); tokens whose slot is negative are skipped. Casts to the cache dtype."""
    assert key.dim() == 3 and value.dim() == 3, (key.shape, value.shape)
    num_tokens, num_kv_heads, head_dim = key.shape
    v_head_dim = value.shape[2]
    assert value.shape[:2] == key.shape[:2], (key.shape, value.shape)
    key_cache, value_cache = split_kv_cache(kv_cache, head_dim)
    assert key_cache.shape[2:] == (num_kv_heads, head_dim), (kv_cache.shape, key.shape)
    assert value_cache.shape[2:] == (num_kv_heads, v_head_dim), (kv_cache.shape, value.shape)
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    for name, t in (("key", key), ("value", value)):
        assert t.stride(2) == 1 and t.stride(1) == t.shape[2], f"{name} heads must be contiguous"
    assert key.device == value.device == kv_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    row, row_v = num_kv_heads * head_dim, num_kv_heads * v_head_dim
    block = min(triton.next_power_of_2(max(row, row_v)), 4096)
    grid = (num_tokens, triton.cdiv(max(row, row_v), block))
    reshape_and_cache_kernel[grid](
        key_ptr=key,
        value_ptr=value,
        cache_ptr=key_cache,
        slot_mapping_ptr=slot_mapping,
        stride_kt=key.stride(0),
        stride_vt=value.stride(0),
        value_offset=value_offset(key_cache, value_cache),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=v_head_dim,
        STRIDE_TOKEN=key_cache.stride(1),
        STRIDE_HEAD=key_cache.stride(2),
        ROW=row,
        ROW_V=row_v,
        BLOCK=block,
        num_warps=4,
    )
