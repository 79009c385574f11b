"""KV cache allocation and sizing: which caches a model needs, what a block costs, how
many blocks a memory budget holds.

The cache of each attention layer is one tensor ``[2, num_blocks, block_size, Hkv, D]``
(keys, values; ``[1, ..., Hkv, D + Dv]`` for a value head size ``Dv != D``, see
`runtime.attention.kv_layout`). Every layer uses the same block ids for a sequence, so one
block table per sequence addresses all layers (the engine's `BlockManager` only counts
blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.attention.kv_layout import kv_cache_shape
from runtime.attention.layer import attention_layers


def kv_cache_layouts(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(num_kv_heads, head_dim, v_head_dim)`` of each KV cache, indexed by `kv_cache_index`.

    Layers that share a `kv_cache_index` (shared-KV models) must agree on the layout. A
    model whose layer stack runs several times per forward, each application in its own
    caches (hrm_text), declares ``num_kv_cache_slots``: that many caches, all of the one
    layout its attention layers must then share.
    """
    layouts: dict[int, tuple[int, int, int]] = {}
    for layer in attention_layers(model):
        layout = (layer.num_kv_heads, layer.head_dim, layer.v_head_dim)
        seen = layouts.setdefault(layer.kv_cache_index, layout)
        if seen != layout:
            raise ValueError(
                f"attention layers sharing kv_cache_index {layer.kv_cache_index} disagree on "
                f"(num_kv_heads, head_dim, v_head_dim): {seen} vs {layout}"
            )
    if not layouts:
        raise ValueError(f"{type(model).__name__} has no PagedAttention layer; nothing to cache")
    if sorted(layouts) != list(range(len(layouts))):
        raise ValueError(f"kv_cache_index values must be 0..n-1, got {sorted(layouts)}")
    slots = getattr(model, "num_kv_cache_slots", None)
    if slots is not None:
        if len(set(layouts.values())) != 1 or slots < len(layouts):
            raise ValueError(
                f"{type(model).__name__} declares {slots} KV cache slots over "
                f"{len(layouts)} attention layers of layouts {sorted(set(layouts.values()))}: "
                "slots need at least one per layer and one shared layout"
            )
        return [layouts[0]] * slots
    return [layouts[i] for i in range(len(layouts))]


def kv_cache_block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs over all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(block_size * h * (d + dv) * itemsize for h, d, dv in kv_cache_layouts(model))


def allocate_kv_caches(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One zeroed cache tensor per `kv_cache_index` (``[2, num_blocks, block_size, Hkv, D]``,
    or ``[1, ..., Hkv, D + Dv]`` where the value head size differs).

    Zeroed rather than empty: padding lanes of a kernel may read unwritten slots, and
    NaN garbage times a zero attention weight is still NaN.
    """
    if num_blocks < 1:
        raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
    return [
        torch.zeros(kv_cache_shape(num_blocks, block_size, h, d, dv), dtype=dtype, device=device)
        for h, d, dv in kv_cache_layouts(model)
    ]


def num_blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    if budget_bytes < block_bytes:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes holds no block of {block_bytes} bytes; "
            f"give more memory (kv_cache_memory_bytes / gpu_memory_utilization)"
        )
    return budget_bytes // block_bytes


def cuda_kv_budget_bytes(
    device: torch.device, gpu_memory_utilization: float, profile_peak_bytes: int
) -> int:
    """Bytes left for the KV cache on `device`: its total times `gpu_memory_utilization`,
    minus the peak torch allocation of the profiling forward (weights + activations) and
    memory held outside torch's allocator (CUDA context, NCCL buffers)."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    return int(total * gpu_memory_utilization) - profile_peak_bytes - max(0, outside_torch)
