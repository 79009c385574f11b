"""Launch configurations of the attention kernels (runtime/attention/triton_config.py):
derived from head sizes, dtype and the device's shared memory, every supported
combination fits, and the shared-memory estimate is never below what Triton allocates."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from runtime.attention.triton_config import (
    HEAD_DIMS,
    DecodeConfig,
    KernelTarget,
    PrefillConfig,
    block_g,
    decode_config,
    decode_smem_bytes,
    decode_stages,
    prefill_config,
    prefill_smem_bytes,
)

H200 = KernelTarget(shared_memory=232_448, sm_count=132)
TARGETS = [
    H200,
    KernelTarget(shared_memory=166_912, sm_count=108),  # A100
    KernelTarget(shared_memory=101_376, sm_count=128),  # sm_86 / sm_89 (RTX 30xx / 40xx, L40)
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (key head size, value head size): every HEAD_DIMS entry, and MLA's split.
HEAD_SIZES = [(d, d) for d in HEAD_DIMS] + [(192, 128), (128, 64)]
# (head sizes, dtype, query heads per KV head) of every supported model: any head size
# with GQA groups up to 16, and multi-query models with many heads (Falcon-7B: 71 query
# heads of 64 over one KV head), whose decode program holds all of a group's query rows.
COMBINATIONS = [
    *itertools.product(HEAD_SIZES, DTYPES, (1, 4, 8, 16)),
    *itertools.product([(64, 64), (128, 128)], DTYPES, (71,)),
]

p2 = triton.next_power_of_2


def decode_need(cfg: DecodeConfig, d: int, dv: int, dtype, group: int, stages: int) -> int:
    return decode_smem_bytes(block_g(group), cfg.block_n, p2(d), p2(dv), dtype.itemsize, stages)


def prefill_need(cfg: PrefillConfig, d: int, dv: int, dtype) -> int:
    return prefill_smem_bytes(
        cfg.block_m, cfg.block_n, p2(d), p2(dv), dtype.itemsize, cfg.num_stages
    )


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"smem{t.shared_memory}")
def test_every_combination_fits_the_shared_memory(target):
    for (d, dv), dtype, group in COMBINATIONS:
        cfg = decode_config(d, dv, dtype, group, target)
        # Every stage count the launcher may pick (any grid size) fits.
        for programs in (1, target.sm_count, 2 * target.sm_count + 1, 10**6):
            stages = decode_stages(programs, torch.device("cpu"), cfg)
            assert stages <= cfg.max_stages
        for stages in range(1, cfg.max_stages + 1):
            need = decode_need(cfg, d, dv, dtype, group, stages)
            assert need <= target.shared_memory, (d, dv, dtype, group, cfg, stages, need)
        pcfg = prefill_config(d, dv, dtype, target)
        need = prefill_need(pcfg, d, dv, dtype)
        assert need <= target.shared_memory, (d, dv, dtype, pcfg, need)
        assert pcfg.block_m >= 16 and pcfg.block_n >= 16 and cfg.block_n >= 16  # tl.dot minimum


def test_tuned_configs_kept_where_they_fit():
    # The H200-tuned bf16 choices are what the derivation returns there.
    assert decode_config(128, 128, torch.bfloat16, 4, H200) == DecodeConfig()
    assert prefill_config(128, 128, torch.bfloat16, H200) == PrefillConfig()
    assert prefill_config(64, 64, torch.float16, H200) == PrefillConfig()
    assert prefill_config(128, 128, torch.float32, H200) == PrefillConfig(64, 64, 4, 2)
    assert prefill_config(256, 256, torch.bfloat16, H200) == PrefillConfig(64, 32, 8, 2)


def test_fp32_large_heads_step_down_instead_of_failing():
    # Issue 16: fp32 head_dim 192/256 decode asked for 282,688 bytes of shared memory on an
    # H200 (232,448 available) with 64 tokens per iteration and 3 stages.
    old = decode_smem_bytes(16, 64, 256, 256, 4, 3)
    assert old >= 282_688 > H200.shared_memory
    for d in (192, 256):
        cfg = decode_config(d, d, torch.float32, 4, H200)
        assert cfg.max_stages < 3 or cfg.block_n < 64
        assert decode_need(cfg, d, d, torch.float32, 4, cfg.max_stages) <= H200.shared_memory


def test_no_fitting_config_is_one_clear_error():
    # 71 fp32 query rows of 256 do not fit 99 KiB in one decode program.
    with pytest.raises(ValueError, match="head_dim 256/256 in torch.float32"):
        decode_config(256, 256, torch.float32, 71, TARGETS[2])
    tiny = KernelTarget(shared_memory=8_192, sm_count=1)
    with pytest.raises(ValueError, match="shared memory.*bfloat16"):
        decode_config(256, 256, torch.float32, 4, tiny)
    with pytest.raises(ValueError, match="HF2PAGED_ATTENTION_BACKEND=torch"):
        prefill_config(256, 256, torch.float32, tiny)


def test_interpreter_configs_are_the_small_test_tiles():
    cpu = KernelTarget(shared_memory=None, sm_count=4)
    assert decode_config(256, 256, torch.float32, 4, cpu) == DecodeConfig()
    assert prefill_config(256, 256, torch.float32, cpu).block_m == 16


# Shared memory Triton 3.6 allocated for sm_90 (benchmarks/attention_smem.py, which
# compiles the launchers' own launches ahead of time; the 282,688 case is also the H200's
# error message in issue 16). kind, G rows, M or N tiles, D, Dv, itemsize, stages: bytes.
COMPILED = [
    ("decode", 16, 64, 256, 256, 4, 3, 282_688),
    ("decode", 16, 64, 256, 256, 4, 2, 151_616),
    ("decode", 16, 64, 256, 256, 4, 1, 86_080),
    ("decode", 16, 32, 256, 256, 4, 3, 149_568),
    ("decode", 16, 64, 128, 128, 4, 3, 143_424),
    ("decode", 16, 64, 128, 128, 2, 3, 71_680),
    ("decode", 16, 64, 256, 256, 2, 3, 141_312),
    ("decode", 16, 32, 64, 64, 2, 2, 11_264),
    ("prefill", 64, 32, 64, 64, 4, 2, 41_216),
    ("prefill", 128, 128, 64, 64, 4, 3, 229_888),
    ("prefill", 128, 64, 64, 64, 4, 1, 81_920),
    ("prefill", 64, 64, 64, 64, 2, 3, 57_344),
    ("prefill", 64, 32, 64, 64, 2, 1, 12_288),
]


@pytest.mark.parametrize("case", COMPILED, ids=str)
def test_estimate_is_honest_against_compiled_kernels(case):
    kind, rows, n, d, dv, itemsize, stages, compiled = case
    estimate = (decode_smem_bytes if kind == "decode" else prefill_smem_bytes)(
        rows, n, d, dv, itemsize, stages
    )
    assert compiled <= estimate <= compiled * 1.1 + 1024, (estimate, compiled)


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() or shutil.which("ptxas") is not None


needs_ptxas = pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its CUDA backend")


def _check_compiled(kind: str, head_dim: int, v_head_dim: int, dtype, groups="4") -> None:
    """benchmarks/attention_smem.py in a process of its own (the tests run Triton's
    interpreter, which compiles nothing): the launches made with the configurations
    derived for an H200, compiled for sm_90; it fails when Triton needs more shared
    memory than the estimate or the H200 has."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "attention_smem.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(script), "--kinds", kind, "--head-dims", str(head_dim),
           "--v-head-dim", str(v_head_dim), "--dtypes", str(dtype).split(".")[1], "--groups", groups]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| decode" in proc.stdout or "| prefill" in proc.stdout, proc.stdout


@needs_ptxas
def test_issue_case_compiles_within_an_h200():
    # fp32, head_dim 192 decode: compiled for sm_90 here (no GPU), as the launcher launches it.
    _check_compiled("decode", 192, 192, torch.float32)


@pytest.mark.slow
@needs_ptxas
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (256, 256), (192, 128)], ids=str)
def test_derived_configs_compile_within_an_h200(kind, dtype, dims):
    _check_compiled(kind, *dims, dtype, groups="1,8")
