"""`reshape_and_cache`: store this step's K/V into the paged cache by slot (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def reshape_and_cache_kernel(
    key_ptr,  # [T, Hkv, D], rows stride_kt apart, (Hkv, D) contiguous
    value_ptr,  # [T, Hkv, D], rows stride_vt apart, (Hkv, D) contiguous
    cache_ptr,  # [2, num_blocks, block_size, Hkv, D] contiguous
    slot_mapping_ptr,  # [T] int64, < 0 = skip
    stride_kt,
    stride_vt,
    value_offset,  # elements from the K half to the V half: num_blocks * block_size * Hkv * D
    ROW: tl.constexpr,  # Hkv * D elements per token
    BLOCK: tl.constexpr,  # power of two: the chunk of ROW one program copies
):
    token = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    # Padding tokens of CUDA-graph batches carry slot -1: an empty row limit masks all
    # their loads and stores (one comparison; the interpreter also mis-types `&` of a
    # vector with a scalar bool).
    limit = tl.where(slot >= 0, ROW, 0)
    mask = offs < limit
    row = token.to(tl.int64)
    k = tl.load(key_ptr + row * stride_kt + offs, mask=mask)
    v = tl.load(value_ptr + row * stride_vt + offs, mask=mask)
    # int64 address math: num_blocks * block_size * Hkv * D passes 2**31 on large caches.
    dst = cache_ptr + slot * ROW + offs
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + value_offset, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, < 0 = skip
) -> None:
    """Write ``key[t]``/``value[t]`` to cache slot ``slot_mapping[t]`` (block * block_size +
    offset); tokens whose slot is negative are skipped. Casts to the cache dtype."""
    assert key.dim() == 3 and key.shape == value.shape, (key.shape, value.shape)
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, kv_cache.shape
    num_tokens, num_kv_heads, head_dim = key.shape
    assert kv_cache.shape[3:] == (num_kv_heads, head_dim), (kv_cache.shape, key.shape)
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    for name, t in (("key", key), ("value", value)):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, f"{name} heads must be contiguous"
    assert key.device == value.device == kv_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    block = min(triton.next_power_of_2(row), 4096)
    grid = (num_tokens, triton.cdiv(row, block))
    reshape_and_cache_kernel[grid](
        key_ptr=key,
        value_ptr=value,
        cache_ptr=kv_cache,
        slot_mapping_ptr=slot_mapping,
        stride_kt=key.stride(0),
        stride_vt=value.stride(0),
        value_offset=kv_cache[0].numel(),
        ROW=row,
        BLOCK=block,
        num_warps=4,
    )
