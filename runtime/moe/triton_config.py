"""Launch configurations of the fused-MoE kernels, chosen in one place.

Two regimes, told apart by the routed pairs per expert (``num_tokens * top_k / E``):

- decode-sized batches (few pairs per expert): each expert's weights are read for a handful
  of rows, so the GEMMs stream weights. Small BLOCK_M (16) keeps the padding waste low, a deep
  BLOCK_K with 4 stages keeps loads in flight, BLOCK_N shrinks until the grid covers the SMs.
- prefill-sized batches (hundreds of pairs per expert): compute-bound tiles, BLOCK_M 64-128,
  BLOCK_N 128, grouped program order (GROUP_M) so neighbouring programs share weight tiles
  in L2.

The stage count (and then BLOCK_K, BLOCK_N) shrinks until the pipelined tiles fit the
device's shared memory: the gate/up GEMM holds two weight tiles per stage (gate and up).
On CPU (the Triton interpreter) tiles stay small: every op runs through numpy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    """``block_m`` is shared: both GEMMs read the same expert-sorted, padded pair list."""

    block_m: int
    gate_up: TileConfig
    down: TileConfig


@functools.lru_cache(maxsize=8)
def device_limits(device: torch.device) -> tuple[int, int] | None:
    """(shared memory bytes per block, SM count) of a CUDA device; None elsewhere (the
    Triton interpreter, where tiles stay small)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return smem, props.multi_processor_count


def _fit_shared_memory(
    tile: TileConfig, block_m: int, weight_tiles: int, elem_bytes: int, smem: int
) -> TileConfig:
    def need(t: TileConfig) -> int:
        per_stage = (block_m * t.block_k + weight_tiles * t.block_k * t.block_n) * elem_bytes
        return t.num_stages * per_stage + 2048  # + barriers / epilogue scratch

    while need(tile) > smem and tile.num_stages > 2:
        tile = replace(tile, num_stages=tile.num_stages - 1)
    while need(tile) > smem and tile.block_k > 32:
        tile = replace(tile, block_k=tile.block_k // 2)
    while need(tile) > smem and tile.block_n > 32:
        tile = replace(tile, block_n=tile.block_n // 2)
    return tile


def default_moe_config(
    num_tokens: int,
    top_k: int,
    num_experts: int,  # experts held on this rank
    hidden_size: int,
    intermediate_size: int,  # this rank's per-expert intermediate size
    dtype: torch.dtype,
    device: torch.device,
) -> MoEConfig:
    limits = device_limits(device)
    if limits is None:
        tile = TileConfig(block_n=32, block_k=32, num_stages=1)
        return MoEConfig(block_m=16, gate_up=tile, down=tile)
    smem, sms = limits
    elem = dtype.itemsize
    pairs_per_expert = num_tokens * top_k / max(1, num_experts)
    if pairs_per_expert <= 16:
        block_m = 16
    elif pairs_per_expert <= 48:
        block_m = 32
    elif pairs_per_expert <= 192:
        block_m = 64
    else:
        block_m = 128
    if block_m <= 32:  # weight streaming
        tile = TileConfig(block_n=64, block_k=128 if elem <= 2 else 64, num_warps=4, num_stages=4)
    else:
        tile = TileConfig(
            block_n=128, block_k=64 if elem <= 2 else 32, group_m=8,
            num_warps=8 if block_m == 128 else 4, num_stages=3,
        )  # fmt: skip
    # Experts that receive a pair bound the row blocks; narrow the N tiles until the
    # weight-streaming grid covers every SM (at least 32 columns per tile).
    row_blocks = min(num_experts, num_tokens * top_k)
    configs = []
    for n, weight_tiles in ((intermediate_size, 2), (hidden_size, 1)):
        t = tile
        while block_m <= 32 and t.block_n > 32 and row_blocks * -(-n // t.block_n) < sms:
            t = replace(t, block_n=t.block_n // 2)
        configs.append(_fit_shared_memory(t, block_m, weight_tiles, elem, smem))
    return MoEConfig(block_m=block_m, gate_up=configs[0], down=configs[1])


def config_change_token_counts(
    max_tokens: int,
    top_k: int,
    num_experts: int,  # experts held on this rank
    hidden_size: int,
    intermediate_size: int,  # this rank's per-expert intermediate size
    dtype: torch.dtype,
    device: torch.device,
) -> list[int]:
    """The smallest token count of each distinct `default_moe_config` over 1..max_tokens.

    Triton compiles the expert kernels once per launch configuration (tile sizes, stages,
    warps are compile-time), and the configuration follows the step's token count: a run
    of these counts meets every variant a serving step of up to `max_tokens` tokens can ask
    for (runtime/engine/kernel_warmup.py)."""
    first_count: dict[MoEConfig, int] = {}
    for num_tokens in range(1, max_tokens + 1):
        config = default_moe_config(
            num_tokens, top_k, num_experts, hidden_size, intermediate_size, dtype, device
        )
        first_count.setdefault(config, num_tokens)
    return sorted(first_count.values())
