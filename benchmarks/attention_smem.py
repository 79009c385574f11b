"""Shared memory of the attention kernels, compiled ahead of time for a GPU that is not
here: Triton's own number beside `runtime.attention.triton_config`'s estimate.

    python benchmarks/attention_smem.py                # sm_90 (Hopper), every combination
    python benchmarks/attention_smem.py --arch 80 --head-dims 128,256 --dtypes float32

The kernels' launchers (`paged_decode`, `paged_prefill`) run on small CPU tensors with
their kernel swapped for a recorder, so the compile-time constants, warps and stages
are exactly the ones a launch on the GPU would pass; `triton.compile` then builds that
variant for the target (ptxas ships with Triton: no GPU, no driver) and its metadata
says how many bytes of shared memory a launch needs. The estimate must never be below
that number (an estimate under it is a launch that raises OutOfResources). The GPU
sweep (`benchmarks/attention_sweep.py`) reads the same metadata off the kernels it
actually ran.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from runtime.attention import triton_decode, triton_prefill  # noqa: E402
from runtime.attention.kv_layout import kv_cache_shape  # noqa: E402
from runtime.attention.params import AttentionParams  # noqa: E402
from runtime.attention.triton_common import dot_precision  # noqa: E402
from runtime.attention.triton_config import (  # noqa: E402
    HEAD_DIMS,
    KernelTarget,
    decode_config,
    decode_smem_bytes,
    prefill_config,
    prefill_smem_bytes,
)
from runtime.engine.step_inputs import StepInputs  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Launch:
    """One kernel launch as the launcher made it: the kernel and its keyword arguments."""

    kernel: triton.JITFunction
    kwargs: dict
    compiled: object = None  # the CompiledKernel, when the launch ran (`recording(run=True)`)
    error: str = ""  # why compiling it ahead of the launch failed


class _Recorder:
    """Stands in for a `@triton.jit` kernel: ``kernel[grid](**kwargs)`` records the call,
    and with ``run`` also compiles it (Triton's ``warmup``: the compiled kernel is
    recorded even when loading it fails) and launches it."""

    def __init__(self, kernel, launches: list[Launch], run: bool) -> None:
        self.kernel, self.launches, self.run = kernel, launches, run

    def __getitem__(self, grid):
        def launch(**kwargs):
            record = Launch(self.kernel, kwargs)
            self.launches.append(record)
            if self.run:
                if isinstance(self.kernel, JITFunction):  # not under the interpreter
                    try:
                        record.compiled = self.kernel.warmup(grid=grid, **kwargs)
                    except Exception as exc:  # noqa: BLE001 — the launch below reports it
                        record.error = f"{type(exc).__name__}: {exc}"
                self.kernel[grid](**kwargs)

        return launch


ATTENTION_KERNELS = (
    (triton_decode, "paged_decode_kernel"),
    (triton_prefill, "paged_prefill_kernel"),
)


@contextlib.contextmanager
def recording(launches: list[Launch], run: bool = False):
    """While the launchers run, record every launch of the attention kernels into
    ``launches``; without ``run`` nothing is compiled or launched."""
    saved = []
    for module, name in ATTENTION_KERNELS:
        kernel = getattr(module, name)
        saved.append((module, name, kernel))
        setattr(module, name, _Recorder(kernel, launches, run))
    try:
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


# An H200's shared memory per program (the opt-in maximum per block) and SM count.
H200 = KernelTarget(shared_memory=232_448, sm_count=132)


def recorded_launches(
    kind: str,  # "decode" | "prefill"
    head_dim: int,
    dtype: torch.dtype,
    *,
    v_head_dim: int | None = None,
    group: int = 4,
    block_size: int = 16,
    target: KernelTarget = H200,
    **launch,
) -> list[Launch]:
    """The attention-kernel launches `paged_attention` makes on ``target`` for a
    decode-only or a prefill-only batch of this shape: the launchers run on tiny CPU
    tensors with the configurations derived for ``target`` (nothing compiles or runs).
    ``launch``: overrides (``decode_config``, ``prefill_config``, ``num_splits``)."""
    from runtime.attention.triton_ops import paged_attention

    v_head_dim = v_head_dim or head_dim
    num_kv_heads, num_seqs = 2, 4
    launch.setdefault("decode_config", decode_config(head_dim, v_head_dim, dtype, group, target))
    launch.setdefault("prefill_config", prefill_config(head_dim, v_head_dim, dtype, target))
    query_len = 1 if kind == "decode" else 3
    tables = [[i] for i in range(num_seqs)]
    step = StepInputs.build(tables, [2] * num_seqs, [query_len] * num_seqs, block_size)
    md = step.to_device().metadata
    shape = kv_cache_shape(num_seqs, block_size, num_kv_heads, head_dim, v_head_dim)
    cache = torch.zeros(shape, dtype=dtype)
    query = torch.zeros(md.num_tokens, num_kv_heads * group, head_dim, dtype=dtype)
    launches: list[Launch] = []
    with recording(launches):
        paged_attention(query, cache, md, AttentionParams(scale=1.0), **launch)
    # On a GPU the dot precision follows the dtype alone (the CPU interpreter widens bf16).
    for rec in launches:
        rec.kwargs["DOT_PREC"] = dot_precision(dtype, torch.device("cuda"))
    return launches


def compile_for(launch: Launch, arch: int):
    """`triton.compile` of the recorded launch for ``cuda:<arch>``; the compiled kernel."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = launch.kwargs[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[param.name] = value
            continue
        if isinstance(value, torch.Tensor):
            # Tensors from torch's allocators are 16-byte aligned on the GPU.
            value = _AlignedTensor(value)
        ty, key = native_specialize_impl(
            BaseBackend, value, False, not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )  # fmt: skip
        signature[param.name] = ty
        if ty == "constexpr":
            constants[param.name] = value
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    src = ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


class _AlignedTensor:
    """What Triton's specialisation reads of a tensor argument: its dtype and an
    address, here one the GPU allocator would give (256-byte aligned)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return 1 << 20


def estimate(launch: Launch) -> int:
    """`triton_config`'s estimate for the recorded launch."""
    k = launch.kwargs
    item = launch.kwargs["query_ptr"].element_size()
    if launch.kernel is triton_decode.paged_decode_kernel:
        return decode_smem_bytes(
            k["BLOCK_G"], k["BLOCK_N"], k["BLOCK_D"], k["BLOCK_DV"], item, k["num_stages"]
        )
    return prefill_smem_bytes(
        k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_D"], k["BLOCK_DV"], item, k["num_stages"]
    )


def describe(launch: Launch) -> str:
    k = launch.kwargs
    name = "decode" if launch.kernel is triton_decode.paged_decode_kernel else "prefill"
    tiles = f"n{k['BLOCK_N']}" + (f" m{k['BLOCK_M']}" if "BLOCK_M" in k else f" g{k['BLOCK_G']}")
    return (
        f"{name} D{k['HEAD_DIM']}/{k['HEAD_DIM_V']} {k['query_ptr'].dtype} {tiles} "
        f"w{k['num_warps']} s{k['num_stages']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    p.add_argument("--shared-memory", type=int, default=H200.shared_memory,
                   help="bytes per program the configurations are derived for (default: H200)")  # fmt: skip
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    p.add_argument("--v-head-dim", type=int, default=None, help="value head size (default: same)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--groups", default="4", help="query heads per KV head, comma-separated")
    p.add_argument("--kinds", default="decode,prefill")
    args = p.parse_args()
    target = KernelTarget(shared_memory=args.shared_memory, sm_count=H200.sm_count)
    print(f"sm_{args.arch}, triton {triton.__version__}, budget {target.shared_memory} bytes\n")
    print("| launch | Triton bytes | estimate | estimate / Triton | fits |")
    print("|---|---:|---:|---:|---|")
    bad = 0
    for kind, dim, dt, group in itertools.product(
        args.kinds.split(","), [int(d) for d in args.head_dims.split(",")],
        args.dtypes.split(","), [int(g) for g in args.groups.split(",")],
    ):  # fmt: skip
        launches = recorded_launches(
            kind, dim, DTYPES[dt], v_head_dim=args.v_head_dim, group=group, target=target
        )
        for launch in launches:
            shared = compile_for(launch, args.arch).metadata.shared
            est = estimate(launch)
            fits = shared <= target.shared_memory
            bad += est < shared or not fits
            flag = "" if est >= shared else " **under**"
            print(
                f"| {describe(launch)} | {shared} | {est} | {est / shared:.2f}{flag} | "
                f"{'yes' if fits else '**no**'} |",
                flush=True,
            )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
