"""Launch configurations of the attention kernels and the split-count heuristic."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeConfig:
    """Decode launch parameters. ``programs_per_sm`` sets the split count: splits =
    round(programs_per_sm * SMs / (num_seqs * Hkv)), clamped to [1, max_splits].

    Defaults from `benchmarks/attention_tune.py` on an H200 (bf16, d128, 32/8 heads):
    64 tokens per iteration with 4 warps and 2 stages was within noise of the best tile
    at every shape; ~4 programs per SM balanced batch 1 x 32k against batch 32 x 8k.
    """

    block_n: int = 64  # tokens per loop iteration
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: float = 4.0
    max_splits: int = 64


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill launch parameters (query tile x key tile)."""

    block_m: int = 128  # query tokens per program
    block_n: int = 128  # keys per loop iteration
    num_warps: int = 8
    num_stages: int = 2


def default_prefill_config(
    head_dim: int, dtype: torch.dtype, device: torch.device
) -> PrefillConfig:
    if device.type != "cuda":
        # The interpreter runs each op with numpy: small tiles keep tests fast.
        return PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:  # 4-byte tiles: halve them to stay in shared memory
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return PrefillConfig()


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter on CPU: pretend to be a small GPU so that tests exercise the split path.
    return 4


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, device: torch.device, config: DecodeConfig
) -> int:
    """Splits depend only on batch shape and device, never on sequence lengths, so one
    captured CUDA graph stays valid as the sequences grow."""
    target = config.programs_per_sm * _sm_count(device)
    return max(1, min(config.max_splits, round(target / max(1, num_seqs * num_kv_heads))))
