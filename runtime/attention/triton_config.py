"""Launch configurations of the attention kernels and the split-count heuristic."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeConfig:
    """Decode launch parameters. ``programs_per_sm`` sets the split count: splits =
    round(programs_per_sm * SMs / (num_seqs * Hkv)), clamped to [1, max_splits].
    ``num_stages=None`` picks 3 when all programs fit one wave at 2 per SM, else 2.

    Defaults from `benchmarks/attention_tune.py` on an H200 (bf16, d128, 32/8 heads,
    block 16; `benchmarks/results/attention-nvidia-h200-tune.md`): 64 tokens per
    iteration and 4 warps won at every shape; 3 stages (two loads in flight) was best
    with <= 2 programs per SM (0.99x SDPA at 1 x 32k, 8 x 16k, 32 x 8k) but 15-20%
    slower with 4 per SM (a second wave: its buffers fit only 2 programs per SM), where
    2 stages reached 0.98-0.99x.
    """

    block_n: int = 64  # tokens per loop iteration
    num_warps: int = 4
    num_stages: int | None = None
    programs_per_sm: float = 2.0
    max_splits: int = 64


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill launch parameters (query tile x key tile)."""

    block_m: int = 128  # query tokens per program
    block_n: int = 128  # keys per loop iteration
    num_warps: int = 8
    num_stages: int = 3  # H200 sweep: 369 us vs 404 us (2 stages) on a 4k prompt


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
    captured CUDA graph stays valid as the sequences grow. The count is a power of two
    (rounded down): it is a compile-time constant of the kernels, and a handful of values
    lets the engine compile every variant before serving (runtime/engine/kernel_warmup.py)
    instead of meeting a new one, and compiling it, whenever the decode batch changes."""
    target = config.programs_per_sm * _sm_count(device)
    wanted = max(1, min(config.max_splits, round(target / max(1, num_seqs * num_kv_heads))))
    return 1 << (wanted.bit_length() - 1)


def decode_stages(programs: int, device: torch.device, config: DecodeConfig) -> int:
    """``config.num_stages``, or the tuned choice for a grid of ``programs`` programs."""
    if config.num_stages is not None:
        return config.num_stages
    return 3 if programs <= 2 * _sm_count(device) else 2
