"""Launch-config sweep for the paged attention kernels (GPU); prints each result as it
is measured and writes `benchmarks/results/attention-<device>-tune.md`.

    PYTHONPATH=. python benchmarks/attention_tune.py [--decode-only] [--reps N]

Decode: tokens per iteration x warps x stages on two shapes of one split, then split
counts (programs per SM) on the shapes that need splits. Prefill: tile sizes x warps x
stages. Each config is timed once (median of ``--reps``) after SDPA on the same data.

    PYTHONPATH=. python benchmarks/attention_tune.py --min-split 0,256,512,1024

sweeps instead the fewest tokens per split (`DecodeConfig.min_split_tokens`, the tuned
configuration otherwise) over small batches, both sides timed as CUDA-graph replays (how
the engine decodes; eager times there are mostly Python launch overhead).
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from dataclasses import replace

import torch
from attention import (
    DTYPE,
    HKV,
    HQ,
    PREFILL_CASES,
    D,
    capture,
    decode_setup,
    header,
    max_err,
    prefill_setup,
    result_path,
    timed,
)
from triton.runtime.errors import OutOfResources

from runtime.attention.triton_config import (
    DecodeConfig,
    PrefillConfig,
    choose_num_splits,
    decode_config,
    kernel_target,
)

TILE_SHAPES = [(64, 4096, 16), (32, 8192, 16)]
SPLIT_SHAPES = [(1, 32768, 16), (8, 16384, 16), (32, 8192, 16), (16, 512, 16), (256, 512, 16)]
MIN_SPLIT_SHAPES = [
    (1, 1024, 16), (1, 4096, 16), (1, 32768, 16), (4, 1024, 16), (4, 4096, 16), (8, 16384, 16),
    (16, 512, 16), (16, 1024, 16), (16, 2048, 16), (16, 8192, 16), (32, 512, 16), (64, 256, 16),
]  # fmt: skip


def decode_tiles() -> list[DecodeConfig]:
    return [
        DecodeConfig(block_n=n, num_warps=w, num_stages=s)
        for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
    ]


def decode_splits() -> list[DecodeConfig]:
    return [
        DecodeConfig(block_n=n, num_stages=s, programs_per_sm=p, max_splits=128)
        for n, s, p in itertools.product((32, 64), (2, 3), (1.0, 2.0, 4.0, 8.0))
    ]


def prefill_tiles() -> list[PrefillConfig]:
    return [
        PrefillConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
        if not (m == 128 and w == 4)
    ]


def sweep(paged, expected, configs, base_us: float, say, decode: bool) -> None:
    for cfg in configs:
        try:
            err = max_err(paged(cfg), expected)
            us = timed(lambda c=cfg: paged(c), REPS)
        except OutOfResources:
            say(f"- (does not fit) {cfg}")
            continue
        ratio = f"{base_us / us:.3f}x SDPA speed" if decode else f"{us / base_us:.3f}x SDPA time"
        say(f"- {us:.1f} µs ({ratio}), err {err:.0e}: {cfg}")


def min_split_sweep(values: list[int], say) -> None:
    cuda = torch.device("cuda")
    tuned = decode_config(D, D, DTYPE, HQ // HKV, kernel_target(cuda))
    say(f"\nsplit merging, CUDA-graph replays; otherwise {tuned}")
    configs = {"reduce kernel": replace(tuned, max_fused_splits=0)}
    for value in values:
        configs[f"fused, min {value}"] = replace(
            tuned, max_fused_splits=tuned.max_splits, min_split_tokens=value
        )
    for batch, ctx, block_size in MIN_SPLIT_SHAPES:
        sdpa, paged, expected, _ = decode_setup(batch, ctx, block_size)
        base = min(timed(capture(c, exact=False).replay, REPS) for c in sdpa.values())
        splits = choose_num_splits(batch, HKV, cuda, tuned)
        say(
            f"\ndecode {batch} × {ctx}, block {block_size} (SDPA graph {base:.1f} µs; splits {splits}):"
        )
        for name, cfg in configs.items():
            err = max_err(paged(cfg), expected)
            us = timed(capture(lambda c=cfg, p=paged: p(c)).replay, REPS)
            say(f"- {name}: {us:.1f} µs ({base / us:.3f}x SDPA speed), err {err:.0e}")


def main() -> None:
    global REPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--min-split", default=None, help="comma-separated token counts: sweep only these"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    REPS = args.reps
    lines, _ = header(REPS, "each config timed once as the median of", "attention_tune.py")
    lines[0] += " — launch-config sweep"

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    if args.min_split is not None:
        min_split_sweep([int(v) for v in args.min_split.split(",")], say)
        path = result_path("-tune-min-split")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return
    cuda = torch.device("cuda")
    plan = [(s, decode_tiles()) for s in TILE_SHAPES] + [(s, decode_splits()) for s in SPLIT_SHAPES]
    for (batch, ctx, block_size), configs in plan:
        sdpa, paged, expected, _ = decode_setup(batch, ctx, block_size)
        base = min(timed(c, REPS) for c in sdpa.values())
        splits = sorted({choose_num_splits(batch, HKV, cuda, c) for c in configs})
        say(f"\ndecode {batch} × {ctx}, block {block_size} (SDPA {base:.1f} µs; splits {splits}):")
        sweep(paged, expected, configs, base, say, decode=True)
    if not args.decode_only:
        for name, ctx, new in PREFILL_CASES:
            sdpa, paged, expected, _ = prefill_setup(ctx, new)
            # the kernel itself, also where a fresh prompt would go to cuDNN
            paged = lambda cfg, paged=paged: paged(cfg, sdpa_min_tokens=1 << 30)  # noqa: E731
            times = {n: timed(c, REPS) for n, c in sdpa.items()}
            base = min(times.values())
            say(f"\nprefill {name} (SDPA µs: {times}):")
            sweep(paged, expected, prefill_tiles(), base, say, decode=False)
    path = result_path("-tune")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


REPS = 30

if __name__ == "__main__":
    main()
