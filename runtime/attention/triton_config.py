"""Launch configurations of the attention kernels: the one place they are chosen.

A configuration (tile sizes, warps, pipeline stages) is derived from the head sizes, the
dtype and the GPU's shared memory per program, so that every supported combination
launches: the preferred (tuned) configuration where it fits, else the nearest smaller
one. Fitting is judged by `decode_smem_bytes` / `prefill_smem_bytes`, an estimate of the
shared memory Triton allocates for the kernels (pipeline buffers of the K/V tiles plus
the dot operands that pass through shared memory); `benchmarks/attention_smem.py`
compares it with what Triton compiles for Hopper without a GPU, and
`benchmarks/attention_sweep.py` with the kernels it runs on one. An estimate below the
real need is a launch that raises ``OutOfResources``; the tests hold it above for every
combination the sweep covers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

# Head sizes the GPU sweep and the configuration tests cover (padded to powers of two
# inside the kernels: 80 and 96 run as 128, 160 and 192 as 256).
HEAD_DIMS = (64, 80, 96, 128, 160, 192, 256)

# Shared memory Triton adds beyond the tiles the estimate counts (reduction scratch,
# barriers): at most 576 bytes over every kernel variant compiled for sm_90.
SMEM_SLACK = 1024


@dataclass(frozen=True)
class DecodeConfig:
    """Decode launch parameters. ``programs_per_sm`` sets the split count: splits =
    round(programs_per_sm * SMs / (num_seqs * Hkv)), clamped to [1, max_splits].
    ``num_stages=None`` picks 3 when all programs fit one wave at 2 per SM, else 2, and
    never more than ``max_stages`` (what fits in shared memory, see `decode_config`).

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
    max_stages: int = 3
    programs_per_sm: float = 2.0
    max_splits: int = 64
    # Launches of up to this many splits merge them in the decode kernel, and there a
    # split holds at least min_split_tokens (rounded up to block_n; 0: one iteration's),
    # so a short sequence is not cut at all. More splits go through the reduce kernel
    # (see triton_decode.py). H200, `attention_tune.py --min-split`
    # (`benchmarks/results/attention-nvidia-h200-tune-min-split.md`), CUDA graphs, µs vs
    # cuDNN SDPA's: with 16 sequences (2 splits) one split is faster up to 1024 tokens
    # (16 x 512: 18.5 vs 20.7 µs cut in two, SDPA 18.5; 16 x 1024: 29.4 vs 30.9, SDPA
    # 28.7), while at 2048 and 8192 tokens cutting in two stays as fast; merging 4..32
    # splits in the kernel was 1-3 µs slower than the reduce kernel (1 x 32768: 52.3 vs
    # 49.2; 4 x 1024: 16.5 vs 15.2).
    max_fused_splits: int = 2
    min_split_tokens: int = 1024


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill launch parameters (query tile x key tile)."""

    block_m: int = 128  # query tokens per program
    block_n: int = 128  # keys per loop iteration
    num_warps: int = 8
    num_stages: int = 3  # H200 sweep: 369 us vs 404 us (2 stages) on a 4k prompt


# Fresh prompts (no cached context) of at least this many tokens go to cuDNN through
# torch SDPA instead of the prefill kernel (runtime/attention/sdpa_prefill.py). H200,
# 32/8 heads, d128, bf16 (benchmarks/results/compile-nvidia-h200.md), kernel vs handoff
# in µs: one prompt of 4096 428 vs 295, of 2048 142 vs 109, 4 x 2048 467 vs 426; but
# 8 x 1024 298 vs 623 and 16 x 512 213 vs 1245 (the kernel fills the GPU with many
# prompts at once, the handoff pays a launch and a gather per prompt).
FRESH_PROMPT_SDPA_MIN_TOKENS = 2048

# The interpreter runs each op with numpy: small tiles keep CPU tests fast.
INTERPRETER_PREFILL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@dataclass(frozen=True)
class KernelTarget:
    """What a launch configuration depends on besides the shapes: the shared memory one
    program may use (the device's opt-in maximum per block, bytes; None under Triton's
    CPU interpreter, which has no such limit) and the multiprocessor count."""

    shared_memory: int | None
    sm_count: int

    @property
    def interpreter(self) -> bool:
        return self.shared_memory is None


@functools.lru_cache(maxsize=16)
def kernel_target(device: torch.device) -> KernelTarget:
    if device.type != "cuda":
        # Interpreter on CPU: pretend to be a small GPU so that tests exercise the split path.
        return KernelTarget(shared_memory=None, sm_count=4)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:  # what Triton's launcher checks a kernel's shared memory against
        from triton.runtime import driver

        shared = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # noqa: BLE001 — another backend or an older Triton: torch knows it too
        shared = props.shared_memory_per_block_optin
    return KernelTarget(shared_memory=int(shared), sm_count=props.multi_processor_count)


def _pipeline_buffers(num_stages: int, wgmma: bool) -> int:
    """K/V tile buffers the software pipeline keeps: one per stage ahead of the compute,
    and one more when the dot runs on Hopper's asynchronous warpgroup MMA (it reads its
    operand from shared memory while the next loads land). Without pipelining (1 stage)
    the tiles still pass through one buffer to become dot operands."""
    if num_stages <= 1:
        return 1
    return num_stages if wgmma else num_stages - 1


def decode_smem_bytes(
    block_g: int, block_n: int, block_d: int, block_dv: int, itemsize: int, num_stages: int
) -> int:
    """Shared memory of one decode program: the K and V tiles ([block_n, block_d] and
    [block_n, block_dv]) in flight, plus the query rows and probabilities as dot operands
    ([block_g, block_d], [block_g, block_n])."""
    wgmma = itemsize == 2 and block_g >= 64
    buffers = _pipeline_buffers(num_stages, wgmma)
    if num_stages <= 1:
        tiles = block_n * max(block_d, block_dv) * itemsize
    else:
        tiles = buffers * block_n * (block_d + block_dv) * itemsize
    operands = block_g * (block_d + block_n) * itemsize
    return tiles + operands + SMEM_SLACK


def prefill_smem_bytes(
    block_m: int, block_n: int, block_d: int, block_dv: int, itemsize: int, num_stages: int
) -> int:
    """Shared memory of one prefill program: the K and V tiles in flight, the query tile
    and (without warpgroup MMA) the probabilities as dot operands."""
    wgmma = itemsize == 2 and block_m >= 64
    buffers = _pipeline_buffers(num_stages, wgmma)
    if num_stages <= 1:
        tiles = block_n * max(block_d, block_dv) * itemsize
    else:
        tiles = buffers * block_n * (block_d + block_dv) * itemsize
    operands = block_m * block_d * itemsize
    if not wgmma:
        operands += block_m * block_n * itemsize
    return tiles + operands + SMEM_SLACK


def _fits(need: int, target: KernelTarget) -> bool:
    return target.shared_memory is None or need <= target.shared_memory


def _no_fit(kernel: str, head_dim: int, v_head_dim: int, dtype, target, need: int):
    return ValueError(
        f"the {kernel} attention kernel cannot run head_dim {head_dim}/{v_head_dim} in "
        f"{dtype} on this GPU: even its smallest tiles need {need} bytes of shared memory "
        f"per program and the device has {target.shared_memory}. Use a 16-bit dtype "
        f"(--dtype bfloat16) or HF2PAGED_ATTENTION_BACKEND=torch."
    )


def block_g(group: int) -> int:
    """Query heads of one KV head padded for ``tl.dot`` (>= 16 rows)."""
    return max(16, triton.next_power_of_2(group))


@functools.lru_cache(maxsize=256)
def decode_config(
    head_dim: int, v_head_dim: int, dtype: torch.dtype, group: int, target: KernelTarget
) -> DecodeConfig:
    """The tuned `DecodeConfig` with as many pipeline stages as fit (3, else 2), else
    fewer tokens per iteration, else no pipelining."""
    base = DecodeConfig()
    if target.interpreter:
        return base
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(v_head_dim)
    itemsize = dtype.itemsize
    candidates = [(base.block_n, base.max_stages)]
    candidates += [(n, 2) for n in (base.block_n, 32, 16)]
    candidates += [(n, 1) for n in (base.block_n, 32, 16)]
    need = 0
    for block_n, stages in candidates:
        need = decode_smem_bytes(block_g(group), block_n, block_d, block_dv, itemsize, stages)
        if _fits(need, target):
            return replace(base, block_n=block_n, max_stages=stages)
    raise _no_fit("decode", head_dim, v_head_dim, dtype, target, need)


@functools.lru_cache(maxsize=256)
def prefill_config(
    head_dim: int, v_head_dim: int, dtype: torch.dtype, target: KernelTarget
) -> PrefillConfig:
    """The tuned `PrefillConfig` for this head size and dtype where it fits, else the
    first smaller one that does: fewer stages, then narrower key tiles, then fewer
    query rows per program."""
    if target.interpreter:
        return INTERPRETER_PREFILL
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(v_head_dim)
    itemsize = dtype.itemsize
    width = max(block_d, block_dv)
    if width > 128:
        preferred = PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    elif itemsize == 4:  # 4-byte tiles: halve them to stay in shared memory
        preferred = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    else:
        preferred = PrefillConfig()
    need = 0
    for cfg in _smaller_prefill_configs(preferred):
        need = prefill_smem_bytes(
            cfg.block_m, cfg.block_n, block_d, block_dv, itemsize, cfg.num_stages
        )
        if _fits(need, target):
            return cfg
    raise _no_fit("prefill", head_dim, v_head_dim, dtype, target, need)


def _smaller_prefill_configs(cfg: PrefillConfig):
    """``cfg``, then each step down: stages to 2, key tile halved down to 16, query
    tile halved down to 16, finally one stage."""
    yield cfg
    if cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=2)
        yield cfg
    while cfg.block_n > 16:
        cfg = replace(cfg, block_n=cfg.block_n // 2)
        yield cfg
    while cfg.block_m > 16:
        cfg = replace(cfg, block_m=cfg.block_m // 2, num_warps=min(cfg.num_warps, 4))
        yield cfg
    yield replace(cfg, num_stages=1)


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, device: torch.device, config: DecodeConfig
) -> int:
    """Splits depend only on batch shape and device, never on sequence lengths, so one
    captured CUDA graph stays valid as the sequences grow. The count is a power of two
    (rounded down): it is a compile-time constant of the kernels, and a handful of values
    lets the engine compile every variant before serving (runtime/engine/kernel_warmup.py)
    instead of meeting a new one, and compiling it, whenever the decode batch changes."""
    target = config.programs_per_sm * kernel_target(device).sm_count
    wanted = max(1, min(config.max_splits, round(target / max(1, num_seqs * num_kv_heads))))
    return 1 << (wanted.bit_length() - 1)


def decode_stages(programs: int, device: torch.device, config: DecodeConfig) -> int:
    """``config.num_stages``, or the tuned choice for a grid of ``programs`` programs
    capped at ``config.max_stages``."""
    if config.num_stages is not None:
        return config.num_stages
    tuned = 3 if programs <= 2 * kernel_target(device).sm_count else 2
    return min(tuned, config.max_stages)
