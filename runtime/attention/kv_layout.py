"""The KV cache tensor of one attention layer: its shape, and its key and value views.

Two layouts, both ``[S, num_blocks, block_size, Hkv, W]`` so that dims 1..3 always mean
blocks, tokens per block and KV heads:

- ``S == 2`` (keys and values of one head size ``D``): keys in ``[0]``, values in
  ``[1]``, ``W == D``;
- ``S == 1`` (value head size ``Dv != D``, e.g. MLA's ``v_head_dim``): each token's
  head holds its key in the first ``D`` features and its value in the next ``Dv``,
  ``W == D + Dv``. Nothing is padded: the cache costs ``D + Dv`` per head and token.

Kernels address both through `split_kv_cache`'s views: their strides over tokens and
heads are the same for keys and values, and the values start a fixed element offset
after the keys.
"""

from __future__ import annotations

import torch


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, v_head_dim: int
) -> tuple[int, int, int, int, int]:
    """The cache shape of a layer with keys of ``head_dim`` and values of ``v_head_dim``."""
    if v_head_dim == head_dim:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)
    return (1, num_blocks, block_size, num_kv_heads, head_dim + v_head_dim)


def split_kv_cache(
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W]
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # [num_blocks, block_size, Hkv, D], [..., Dv]
    """Key and value views of a cache built by `kv_cache_shape` (keys of ``head_dim``)."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] not in (1, 2):
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} is not [S, blocks, block_size, Hkv, W]")
    if kv_cache.shape[0] == 2:
        if kv_cache.shape[4] != head_dim:
            raise ValueError(
                f"kv_cache {tuple(kv_cache.shape)} does not hold keys of dim {head_dim}"
            )
        return kv_cache[0], kv_cache[1]
    if kv_cache.shape[4] <= head_dim:
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} leaves no value features after keys of dim {head_dim}"
        )
    return kv_cache[0, ..., :head_dim], kv_cache[0, ..., head_dim:]


def value_offset(key_cache: torch.Tensor, value_cache: torch.Tensor) -> int:
    """Elements from a key to the value of the same token and head (kernels' address math)."""
    assert key_cache.stride() == value_cache.stride(), (key_cache.stride(), value_cache.stride())
    return (value_cache.data_ptr() - key_cache.data_ptr()) // key_cache.element_size()
