"""Every supported attention shape runs and matches the torch reference (GPU; CPU smoke).

    python benchmarks/attention_sweep.py                  # GPU: the whole sweep
    python benchmarks/attention_sweep.py --device cpu     # smoke: Triton's interpreter, tiny shapes

Head sizes `triton_config.HEAD_DIMS` (64..256) x fp32/fp16/bf16 x block sizes 16/32, each
in a mixed batch (a fresh prompt, a chunk after cached context, decodes of 1..~4k
tokens of context) and in a decode-only batch (split-KV), the GQA group cycling through
1/4/8; every group on head sizes 128 and 256; spot checks of sliding windows, soft-capping,
ALiBi (both forms), attention sinks, chunk-local attention (Llama 4) and a value head size different from the key's
(MLA). Each case runs `paged_attention` with its default launch configuration (derived
in `runtime.attention.triton_config` from the head sizes, dtype and this device's shared
memory) and compares with `paged_attention_ref` on the same cache in fp32: relative
error ||out - ref|| / ||ref||, NaN fails (unused cache slots hold NaN, and the output
memory is poisoned with NaN before each call). Every kernel variant that ran is listed
with the shared memory Triton compiled it to and `triton_config`'s estimate, which must
not be below it. Cases run in parallel processes (Triton compiles on the CPU, one kernel
variant at a time per process). Writes `benchmarks/results/attention-sweep-<device>.md`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests", REPO / "benchmarks"):
    sys.path.insert(0, str(path))

DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Relative error allowed: fp32 dots are exact products ("ieee"); 16-bit probabilities are
# rounded to 8 or 11 bits before P @ V.
REL_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Case:
    head_dim: int
    dtype: str
    block_size: int
    group: int  # query heads per KV head (2 KV heads)
    batch: str  # "mixed" | "decode"
    v_head_dim: int | None = None
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    alibi: str | None = None  # None | "relative" | "bf16" (Falcon's)
    sinks: bool = False
    attention_chunk_size: int | None = None

    @property
    def extras(self) -> str:
        parts = []
        if self.v_head_dim:
            parts.append(f"v_head_dim {self.v_head_dim}")
        if self.sliding_window:
            parts.append(f"window {self.sliding_window}")
        if self.logits_soft_cap:
            parts.append(f"soft-cap {self.logits_soft_cap:g}")
        if self.alibi:
            parts.append(f"ALiBi ({self.alibi})")
        if self.sinks:
            parts.append("sinks")
        if self.attention_chunk_size:
            parts.append(f"chunk {self.attention_chunk_size}")
        return ", ".join(parts) or "-"


@dataclass
class Result:
    case: Case
    ok: bool
    rel_err: float = float("nan")
    max_abs: float = float("nan")
    seconds: float = 0.0
    error: str = ""
    configs: str = ""
    kernels: list[tuple[str, int, int]] = field(default_factory=list)  # (variant, Triton, estimate)


def cases(head_dims, dtypes, block_sizes) -> list[Case]:
    out = []
    groups = (1, 4, 8)
    i = 0
    for d in head_dims:
        for dt in dtypes:
            for bs in block_sizes:
                for batch in ("mixed", "decode"):
                    out.append(Case(d, dt, bs, groups[i % 3], batch))
                    i += 1
    for d in (128, 256):
        for dt in ("float32", "bfloat16"):
            for g in groups:
                out.append(Case(d, dt, 16, g, "mixed"))
    spots = [
        dict(sliding_window=300),
        dict(logits_soft_cap=30.0),
        dict(alibi="relative"),
        dict(alibi="bf16"),
        dict(sinks=True),
        dict(sliding_window=500, logits_soft_cap=50.0, sinks=True),
        dict(attention_chunk_size=256),
        dict(attention_chunk_size=1000, sliding_window=700),
    ]
    for d, dt in ((256, "float32"), (128, "bfloat16"), (64, "float16")):
        for batch in ("mixed", "decode"):
            for extra in spots:
                out.append(Case(d, dt, 16, 4, batch, **extra))
    for dt in DTYPE_NAMES:  # MLA-like: keys of 192, values of 128
        for batch in ("mixed", "decode"):
            out.append(Case(192, dt, 16, 4, batch, v_head_dim=128))
    seen, unique = set(), []
    for c in out:
        if c in seen or c.head_dim not in head_dims or c.dtype not in dtypes:
            continue
        seen.add(c)
        unique.append(c)
    return unique


def shapes(case: Case | None, smoke: bool, batch: str | None = None) -> list[tuple[int, int]]:
    """(cached context, new tokens) per sequence."""
    if (batch or case.batch) == "mixed":
        if smoke:
            return [(0, 20), (9, 7), (1, 1), (40, 1), (17, 1)]
        return [(0, 300), (700, 150), (0, 1), (16, 1), (249, 1), (1000, 1), (2500, 1), (3900, 1)]
    if smoke:
        return [(0, 1), (3, 1), (40, 1), (21, 1)]
    return [(c, 1) for c in (0, 4, 15, 32, 99, 256, 599, 1000, 1499, 2199, 2999, 3999)]


def run_case(args: tuple[Case, bool, str]) -> Result:
    case, smoke, device_name = args
    import torch
    from attention_cases import make_batch, to_device
    from attention_smem import describe, estimate, recording

    from runtime.attention.params import Alibi, AttentionParams
    from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref
    from runtime.attention.triton_config import decode_config, kernel_target, prefill_config
    from runtime.attention.triton_ops import paged_attention, reshape_and_cache

    start = time.perf_counter()
    device = torch.device(device_name)
    dtype = getattr(torch, case.dtype)
    hq = 2 * case.group
    v_dim = case.v_head_dim or case.head_dim
    target = kernel_target(device)
    result = Result(case, ok=False)
    seed = zlib.crc32(repr(case).encode()) & 0xFFFF
    try:
        result.configs = _describe_configs(
            decode_config(case.head_dim, v_dim, dtype, case.group, target),
            prefill_config(case.head_dim, v_dim, dtype, target),
            case.batch,
        )
        batch = make_batch(
            shapes(case, smoke), num_heads=hq, num_kv_heads=2, head_dim=case.head_dim,
            v_head_dim=case.v_head_dim, block_size=case.block_size, dtype=dtype,
            block_order=random.Random(seed), seed=seed,
            sliding_window=case.sliding_window, alibi=case.alibi is not None,
            logits_soft_cap=case.logits_soft_cap, sinks=case.sinks, spare_blocks=2, pad_columns=2,
            attention_chunk_size=case.attention_chunk_size,
        )  # fmt: skip
        b = to_device(batch, device)
        alibi = None
        if b.alibi_slopes is not None:
            alibi_dtype = torch.bfloat16 if case.alibi == "bf16" else torch.float32
            alibi = Alibi(b.alibi_slopes, dtype=alibi_dtype)
        params = AttentionParams(
            b.scale, b.sliding_window, b.logits_soft_cap, alibi,
            attention_chunk_size=b.attention_chunk_size,
        )  # fmt: skip
        reshape_and_cache(b.key, b.value, b.kv_cache, b.metadata.slot_mapping)
        # Poison: the output is allocated inside the call; the caching allocator hands
        # back this just-freed block of the same size.
        numel = b.query.shape[0] * hq * v_dim
        torch.full((numel,), float("nan"), dtype=dtype, device=device)
        launches = []
        with recording(launches, run=True):
            out = paged_attention(b.query, b.kv_cache, b.metadata, params, b.sinks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        for launch in launches:
            if launch.compiled is not None:
                result.kernels.append(
                    (describe(launch), launch.compiled.metadata.shared, estimate(launch))
                )
        # Reference: the torch backend on a copy of the cache filled by its own writer.
        ref_cache = to_device(batch, device).kv_cache.float()
        reshape_and_cache_ref(b.key.float(), b.value.float(), ref_cache, b.metadata.slot_mapping)
        ref = paged_attention_ref(b.query.float(), ref_cache, b.metadata, params, b.sinks)
        diff = out.float() - ref
        result.rel_err = (diff.norm() / ref.norm()).item()
        result.max_abs = diff.abs().max().item()
        nan = torch.isnan(out).any().item()
        result.ok = not nan and result.rel_err <= REL_TOL[case.dtype]
        if nan:
            result.error = "NaN in the output"
        elif not result.ok:
            result.error = f"relative error over {REL_TOL[case.dtype]:g}"
    except Exception as exc:  # noqa: BLE001 — one case's failure is a row of the table
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if os.environ.get("SWEEP_TRACEBACK"):
            traceback.print_exc()
    result.seconds = time.perf_counter() - start
    return result


def _describe_configs(decode, prefill, batch: str) -> str:
    text = f"decode n{decode.block_n} w{decode.num_warps} s<={decode.max_stages}"
    if batch == "mixed":
        text += (
            f"; prefill m{prefill.block_m} n{prefill.block_n} w{prefill.num_warps} "
            f"s{prefill.num_stages}"
        )
    return text


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (smoke)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (GPU)")
    p.add_argument("--head-dims", default=None, help="comma-separated subset of HEAD_DIMS")
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES))
    p.add_argument("--block-sizes", default="16,32")
    p.add_argument("--out", type=Path, default=None, help="markdown report path")
    args = p.parse_args()
    smoke = args.device == "cpu"
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    import torch

    from runtime.attention.triton_config import HEAD_DIMS, kernel_target

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    smoke = device == "cpu"
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run the CPU smoke with --device cpu (it sets TRITON_INTERPRET=1 first)")
    head_dims = HEAD_DIMS if args.head_dims is None else tuple(map(int, args.head_dims.split(",")))
    if smoke and args.head_dims is None:
        head_dims = (64, 192)
    all_cases = cases(
        head_dims, args.dtypes.split(","), tuple(map(int, args.block_sizes.split(",")))
    )
    if smoke:
        all_cases = [c for c in all_cases if c.block_size == 16][:24]
    workers = args.workers or (1 if smoke else max(1, min(12, (os.cpu_count() or 2) - 2)))
    print(f"{len(all_cases)} cases on {device}, {workers} processes", flush=True)
    start = time.perf_counter()
    jobs = [(c, smoke, device) for c in all_cases]
    # The heaviest first: they compile the most and set the wall time.
    jobs.sort(key=lambda j: -(j[0].head_dim + (200 if j[0].dtype == "float32" else 0)))
    results: list[Result] = []
    if workers == 1:
        for job in jobs:
            results.append(run_case(job))
            _progress(results[-1], len(results), len(jobs))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(run_case, jobs):
                results.append(r)
                _progress(r, len(results), len(jobs))
    wall = time.perf_counter() - start
    order = {c: i for i, c in enumerate(all_cases)}
    results.sort(key=lambda r: order[r.case])
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    text = report(results, name, kernel_target(dev), wall, workers, " ".join(sys.argv[1:]), smoke)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / (
        "attention-sweep-" + ("cpu-smoke" if smoke else slug) + ".md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    failed = [r for r in results if not r.ok]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} cases pass in {wall:.0f} s; report: {out}"
    )
    sys.exit(1 if failed else 0)


def _progress(r: Result, done: int, total: int) -> None:
    c = r.case
    state = "ok" if r.ok else f"FAIL ({r.error})"
    print(
        f"[{done}/{total}] D{c.head_dim} {c.dtype} bs{c.block_size} G{c.group} {c.batch} "
        f"{c.extras}: rel {r.rel_err:.1e} {state} ({r.seconds:.1f} s)",
        flush=True,
    )


def report(
    results: list[Result],
    device_name: str,
    target,
    wall: float,
    workers: int,
    argv: str,
    smoke: bool = False,
) -> str:
    import torch
    import triton

    passed = sum(r.ok for r in results)
    lines = [
        f"# Attention sweep — {device_name}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, triton {triton.__version__}; shared memory per program "
        f"(opt-in maximum) {target.shared_memory} bytes, {target.sm_count} SMs. Command: "
        f"`python benchmarks/attention_sweep.py{(' ' + argv) if argv else ''}` "
        f"({workers} processes, {wall:.0f} s).",
        "",
        f"**{passed} / {len(results)} cases pass.** Each case: 2 KV heads x G query heads, "
        "the default launch configuration for its head sizes and dtype, output against "
        "`paged_attention_ref` in fp32 (relative error limits: "
        + ", ".join(f"{k} {v:g}" for k, v in REL_TOL.items())
        + "). Sequences (cached context, new tokens): mixed batch "
        + str(shapes(None, smoke, "mixed"))
        + ", decode-only "
        + str(shapes(None, smoke, "decode"))
        + " (split-KV: up to 2 splits merged in the decode kernel, more by the reduce kernel).",
        "",
        "| head dim | dtype | block | G | batch | extras | launch config | rel err | max abs | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.case
        dims = f"{c.head_dim}" + (f"/{c.v_head_dim}" if c.v_head_dim else "")
        state = "pass" if r.ok else f"**FAIL**: {r.error}"
        lines.append(
            f"| {dims} | {c.dtype} | {c.block_size} | {c.group} | {c.batch} | {c.extras} | "
            f"{r.configs} | {r.rel_err:.1e} | {r.max_abs:.1e} | {state} |"
        )
    kernels: dict[str, tuple[int, int]] = {}  # variant -> its worst (Triton, estimate) pair
    for r in results:
        for variant, shared, est in r.kernels:
            old = kernels.get(variant)
            if old is None or est - shared < old[1] - old[0]:
                kernels[variant] = (shared, est)
    if kernels:
        under = [v for v, (s, e) in kernels.items() if e < s]
        lines += [
            "",
            "## Shared memory of every kernel variant that ran",
            "",
            f"Triton's compiled size beside `triton_config`'s estimate; budget "
            f"{target.shared_memory} bytes. "
            + (
                f"**The estimate is below Triton's size for {len(under)} variants.**"
                if under
                else "The estimate is never below Triton's size."
            ),
            "",
            "| kernel variant | Triton bytes | estimate | estimate / Triton |",
            "|---|---:|---:|---:|",
        ]
        for variant in sorted(kernels):
            shared, est = kernels[variant]
            flag = " **under**" if est < shared else ""
            lines.append(f"| {variant} | {shared:,} | {est:,} | {est / shared:.2f}{flag} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
