"""KV cache allocation and the `BlockManager` that hands out its blocks.

The cache of each attention layer is one tensor ``[2, num_blocks, block_size, Hkv, D]``
(keys, values; ``[1, ..., Hkv, D + Dv]`` for a value head size ``Dv != D``, see
`runtime.attention.kv_layout`). Every layer uses the same block ids for a sequence, so one block table
per sequence addresses all layers, and the block manager only counts blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from runtime.attention.kv_layout import kv_cache_shape
from runtime.attention.layer import attention_layers

if TYPE_CHECKING:  # runtime.engine imports this module; avoid the cycle at runtime
    from runtime.engine.sequence import Sequence

# ----------------------------------------------------------------------------- allocation


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


# ------------------------------------------------------------------------- block manager


class Block:
    """One physical KV block: how many sequences use it and, once full and computed, the
    chained hash of its tokens (prefix caching)."""

    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None


class BlockManager:
    """Hands out KV cache blocks to sequences; with prefix caching, shares full blocks.

    A full block's hash chains the previous block's hash with its tokens, so equal hashes
    mean equal prefixes. Blocks are published in the prefix cache (`publish`) once the step
    that computes their K/V is scheduled; a freed block keeps its hash and stays reusable
    until it is evicted, least recently freed first. Free blocks live in an ordered dict
    (O(1) pop from the front and removal by id on a cache hit).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    # -- prefix cache
    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chained hashes of `seq`'s first `num_full_blocks` blocks (memoised on seq)."""
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(seq.block_tokens(i)))))
        return hashes[:num_full_blocks]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding `seq`'s longest cached prefix of full blocks.

        The block of the last token is never taken from the cache: that token must be
        computed to produce logits, and computing it must not write into a shared block.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.hash_to_block_id.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def publish(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Offer `seq`'s full blocks among its first `num_computed_tokens` tokens for reuse.

        Called when the step computing those tokens is scheduled: each layer stores the
        step's K/V before any attention reads, so a sequence scheduled in the same step may
        already read them.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_published_blocks:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = hashes[i]
                # Equal content computed twice keeps the first copy as the cached one.
                self.hash_to_block_id.setdefault(hashes[i], block.block_id)
            assert block.hash == hashes[i], "a cached block changed content"
        seq.num_published_blocks = num_full

    # -- allocation
    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} is still referenced"
        if block.hash is not None:  # evict it from the prefix cache
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _blocks_needed(self, seq: Sequence, hits: list[int]) -> int:
        # Cache hits on freed blocks come out of the free pool too.
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks - len(hits) + revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self._blocks_needed(seq, self._cached_prefix(seq)) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of `seq` (a waiting sequence); cached prefix blocks are
        shared and counted as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "sequence already has blocks"
        hits = self._cached_prefix(seq)
        assert self._blocks_needed(seq, hits) <= self.num_free_blocks, (
            "allocate without can_allocate"
        )
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
        seq.block_table = hits + [
            self._take_free_block() for _ in range(seq.num_blocks - len(hits))
        ]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_published_blocks = len(hits)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the block table can grow to hold every token of `seq` (one new token)."""
        return seq.num_blocks - len(seq.block_table) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Grow `seq`'s block table to hold all its tokens (after a token was appended)."""
        assert seq.block_table, "append_slot on a sequence without blocks"
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Blocks whose last user left go back to the free pool;
        hashed ones at the back (reusable until evicted, tail blocks first), the rest at
        the front (nothing to keep)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_published_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (weights changed, or tests)."""
        self.hash_to_block_id.clear()
        for block in self.blocks:
            block.hash = None
