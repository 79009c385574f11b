"""Sort the routed (token, k) pairs by expert, each expert's run padded to BLOCK_M.

The grouped GEMMs (`runtime.moe.triton_gemm`) give each program BLOCK_M consecutive entries
of ``sorted_ids``, all routed to one expert (``block_expert``), so every tile reads one
expert's weights. With ``c_e`` pairs routed to local expert ``e``:

    sorted_ids     [max_blocks * BLOCK_M] int32  pair ids (s = token * top_k + k), expert by
                   expert, each run padded with the sentinel ``num_pairs`` to a multiple of
                   BLOCK_M; within an expert the pairs keep their order (stable)
    block_expert   [max_blocks] int32  the local expert of each BLOCK_M block (-1 past the end)
    num_padded     [1] int32  sum_e ceil(c_e / BLOCK_M) * BLOCK_M: blocks past it are empty

``max_blocks`` bounds the padded length from the host without reading the routing, so the
launch grid depends only on the batch size (CUDA-graph capturable): each expert that
receives a pair wastes at most BLOCK_M - 1 slots and at most min(E, S) experts receive one.
Pairs routed to experts another rank holds (expert parallelism: ``expert_map`` gives -1)
are left out entirely; the final sum (`moe_sum`) skips them.

Three passes over chunks of pairs, as vLLM's and SGLang's ``moe_align_block_size``: count
each chunk's pairs per expert; one program turns the counts into per-chunk, per-expert write
offsets and the block table; then every chunk scatters its pairs. Small batches (one chunk:
decode) run the three passes in one program, a single launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TILE = 128  # pairs per step inside a program ([TILE, experts] one-hot tiles)
_TILE = tl.constexpr(TILE)
MAX_CHUNKS = 32  # the offsets pass holds a [chunks, experts] tile


@dataclass
class Alignment:
    sorted_ids: torch.Tensor  # [max_blocks * block_m] int32
    block_expert: torch.Tensor  # [max_blocks] int32
    num_padded: torch.Tensor  # [1] int32
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_padded_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(c_e / block_m) over any routing of ``num_pairs`` pairs."""
    busy = min(num_experts, num_pairs)
    return (num_pairs + busy * (block_m - 1)) // block_m


@triton.jit
def _local_experts(
    ids_ptr,  # [S] global expert ids (any int dtype)
    map_ptr,  # [E_global] int32 global -> local, -1 elsewhere (read if HAS_MAP)
    offs,  # [TILE] pair ids
    num_pairs,
    num_experts,  # local expert count
    HAS_MAP: tl.constexpr,
):
    """[TILE] local expert of each pair, -1 when out of range or held by another rank."""
    valid = offs < num_pairs
    expert = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=valid & (expert >= 0), other=-1)
    return tl.where(valid & (expert >= 0) & (expert < num_experts), expert, -1)


@triton.jit
def _count_chunk(
    ids_ptr, map_ptr, chunk, num_pairs, num_experts,
    CHUNK: tl.constexpr, E_POW2: tl.constexpr, HAS_MAP: tl.constexpr,
):  # fmt: skip
    """[E_POW2] pairs per local expert in pairs [chunk * CHUNK, (chunk + 1) * CHUNK)."""
    experts = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for start in range(0, CHUNK, _TILE):
        offs = chunk * CHUNK + start + tl.arange(0, _TILE)
        e = _local_experts(ids_ptr, map_ptr, offs, num_pairs, num_experts, HAS_MAP)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    return counts


@triton.jit
def _scatter_chunk(
    ids_ptr, map_ptr, sorted_ptr, next_pos, chunk, num_pairs, num_experts,
    CHUNK: tl.constexpr, E_POW2: tl.constexpr, HAS_MAP: tl.constexpr,
):  # fmt: skip
    """Write the chunk's pair ids at ``next_pos[e]`` ([E_POW2] first free slot per expert)
    onward, in pair order."""
    experts = tl.arange(0, E_POW2)
    for start in range(0, CHUNK, _TILE):
        offs = chunk * CHUNK + start + tl.arange(0, _TILE)
        e = _local_experts(ids_ptr, map_ptr, offs, num_pairs, num_experts, HAS_MAP)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # [TILE, E_POW2]
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert
        pos = tl.sum((next_pos[None, :] + before) * onehot, axis=1)  # [TILE]
        tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=e >= 0)
        next_pos += tl.sum(onehot, axis=0)


@triton.jit
def _block_table(
    counts,  # [E_POW2] pairs per expert
    block_expert_ptr,
    num_padded_ptr,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCKS_STEP: tl.constexpr,
):
    """Store each block's expert and the padded total; return [E_POW2] each expert's first
    slot."""
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [E_POW2] one past each expert's last slot
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    for first in range(0, max_blocks, BLOCKS_STEP):
        blocks = first + tl.arange(0, BLOCKS_STEP)  # [BLOCKS_STEP]
        slot = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= slot[:, None]).to(tl.int32), axis=1)  # runs passed
        expert = tl.where(slot < total, expert, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)
    return ends - padded


@triton.jit
def _fill(ptr, value, start, stop, STEP: tl.constexpr):
    for first in range(start, stop, STEP):
        offs = first + tl.arange(0, STEP)
        tl.store(ptr + offs, tl.full((STEP,), value, tl.int32), mask=offs < stop)


@triton.jit
def _align_one_program(
    ids_ptr, map_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_experts, max_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_POW2: tl.constexpr,
    HAS_MAP: tl.constexpr, BLOCKS_STEP: tl.constexpr,
):  # fmt: skip
    """Every pass in one program (the pairs fit one chunk)."""
    _fill(sorted_ptr, num_pairs, 0, max_blocks * BLOCK_M, _TILE)
    tl.debug_barrier()  # the padding is written before any thread scatters a pair
    counts = _count_chunk(ids_ptr, map_ptr, 0, num_pairs, num_experts, CHUNK, E_POW2, HAS_MAP)
    starts = _block_table(
        counts, block_expert_ptr, num_padded_ptr, max_blocks, BLOCK_M, E_POW2, BLOCKS_STEP
    )
    _scatter_chunk(
        ids_ptr, map_ptr, sorted_ptr, starts, 0, num_pairs, num_experts, CHUNK, E_POW2, HAS_MAP
    )


@triton.jit
def _count_kernel(
    ids_ptr, map_ptr, counts_ptr, sorted_ptr,
    num_pairs, num_experts, padded_len,
    CHUNK: tl.constexpr, E_POW2: tl.constexpr, HAS_MAP: tl.constexpr,
):  # fmt: skip
    """Pass 1, one program per chunk: counts_ptr[chunk, e] = the chunk's pairs of expert e;
    also fills the chunk's share of ``sorted_ids`` with the padding sentinel."""
    chunk = tl.program_id(0)
    counts = _count_chunk(ids_ptr, map_ptr, chunk, num_pairs, num_experts, CHUNK, E_POW2, HAS_MAP)
    tl.store(counts_ptr + chunk * E_POW2 + tl.arange(0, E_POW2), counts)
    share = tl.cdiv(padded_len, tl.num_programs(0))
    stop = tl.minimum(padded_len, (chunk + 1) * share)
    _fill(sorted_ptr, num_pairs, chunk * share, stop, _TILE)


@triton.jit
def _offsets_kernel(
    counts_ptr, block_expert_ptr, num_padded_ptr, max_blocks, num_chunks,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNKS_POW2: tl.constexpr,
    BLOCKS_STEP: tl.constexpr,
):  # fmt: skip
    """Pass 2, one program: counts_ptr[chunk, e] becomes the slot where the chunk's first
    pair of expert e goes; the block table and padded total are written."""
    chunks = tl.arange(0, CHUNKS_POW2)
    ptrs = counts_ptr + chunks[:, None] * E_POW2 + tl.arange(0, E_POW2)[None, :]
    mask = chunks[:, None] < num_chunks
    counts = tl.load(ptrs, mask=mask, other=0)  # [CHUNKS_POW2, E_POW2]
    before = tl.cumsum(counts, axis=0) - counts  # pairs of earlier chunks, per expert
    starts = _block_table(
        tl.sum(counts, axis=0), block_expert_ptr, num_padded_ptr, max_blocks,
        BLOCK_M, E_POW2, BLOCKS_STEP,
    )  # fmt: skip
    tl.store(ptrs, before + starts[None, :], mask=mask)


@triton.jit
def _scatter_kernel(
    ids_ptr, map_ptr, counts_ptr, sorted_ptr, num_pairs, num_experts,
    CHUNK: tl.constexpr, E_POW2: tl.constexpr, HAS_MAP: tl.constexpr,
):  # fmt: skip
    """Pass 3, one program per chunk: its pairs into their slots."""
    chunk = tl.program_id(0)
    next_pos = tl.load(counts_ptr + chunk * E_POW2 + tl.arange(0, E_POW2))
    _scatter_chunk(
        ids_ptr, map_ptr, sorted_ptr, next_pos, chunk, num_pairs, num_experts,
        CHUNK, E_POW2, HAS_MAP,
    )  # fmt: skip


def moe_align_block_size(
    top_k_index: torch.Tensor,  # [T, k] global expert ids
    num_experts: int,  # local experts (the block table's ids)
    block_m: int,
    expert_map: torch.Tensor | None = None,  # [E_global] int32, -1 for other ranks' experts
) -> Alignment:
    assert top_k_index.dim() == 2 and not top_k_index.is_floating_point(), top_k_index.shape
    assert block_m >= 16 and block_m & (block_m - 1) == 0, f"block_m={block_m}"
    assert expert_map is None or (
        expert_map.dtype == torch.int32 and expert_map.device == top_k_index.device
    )
    ids = top_k_index.contiguous().view(-1)  # [S]
    device, num_pairs = ids.device, ids.numel()
    max_blocks = max(1, max_padded_blocks(num_pairs, num_experts, block_m))
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    common = dict(HAS_MAP=expert_map is not None)
    expert_map = ids if expert_map is None else expert_map  # unread without HAS_MAP
    # Chunks of at least TILE pairs, at most MAX_CHUNKS of them.
    chunk = max(TILE, triton.next_power_of_2(triton.cdiv(num_pairs, MAX_CHUNKS)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    blocks_step = max(16, min(128, 8192 // e_pow2))  # [blocks, experts] tile in _block_table
    if num_chunks <= 1:
        _align_one_program[(1,)](
            ids, expert_map, sorted_ids, block_expert, num_padded,
            num_pairs, num_experts, max_blocks,
            BLOCK_M=block_m, CHUNK=chunk, E_POW2=e_pow2, BLOCKS_STEP=blocks_step,
            num_warps=4, **common,
        )  # fmt: skip
        return Alignment(sorted_ids, block_expert, num_padded, block_m)
    counts = torch.empty(num_chunks, e_pow2, dtype=torch.int32, device=device)
    _count_kernel[(num_chunks,)](
        ids, expert_map, counts, sorted_ids, num_pairs, num_experts, sorted_ids.numel(),
        CHUNK=chunk, E_POW2=e_pow2, num_warps=4, **common,
    )  # fmt: skip
    _offsets_kernel[(1,)](
        counts, block_expert, num_padded, max_blocks, num_chunks,
        BLOCK_M=block_m, E_POW2=e_pow2, CHUNKS_POW2=max(2, triton.next_power_of_2(num_chunks)),
        BLOCKS_STEP=blocks_step, num_warps=8,
    )  # fmt: skip
    _scatter_kernel[(num_chunks,)](
        ids, expert_map, counts, sorted_ids, num_pairs, num_experts,
        CHUNK=chunk, E_POW2=e_pow2, num_warps=4, **common,
    )  # fmt: skip
    return Alignment(sorted_ids, block_expert, num_padded, block_m)
