"""The decoder's projections as the engine runs them (``F.linear``, bf16), per BLAS
library torch can route them through (GPU).

    PYTHONPATH=. python benchmarks/gemm.py --model llama3-8b --tokens 16,64,128,256,8192

Shapes are one layer's fused QKV, output, fused gate/up and down projections plus the LM
head of a preset model (`hf2paged.bench.preset_config`), at each token count: decode
batches and a mixed step's token budget. Each library runs in a process of its own
(``torch.backends.cuda.preferred_blas_library`` applies to the whole process): cuBLAS
(torch's default), cuBLASLt, and torch's TunableOp (``torch.cuda.tunable``: the fastest
of cuBLAS and every cuBLASLt algorithm, timed at each shape's first call). Times are medians of CUDA-event timings with L2 flushed
before each call; the table gives TFLOP/s as % of the bf16 matmul peak (an 8192^3 matmul
in the same process) and weight bytes per second as % of the device copy bandwidth (read
+ write), so a row shows which roof it is under. Writes
`benchmarks/results/gemm-<device>-<model>.md`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import copy_bandwidth, timed  # noqa: E402

LIBRARIES = ("cublas", "cublaslt", "tunableop")


def projections(config) -> dict[str, tuple[int, int]]:
    """name -> (out features, in features) of one decoder layer, and the LM head."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return {
        "qkv": (q + 2 * kv, hidden),
        "o": (hidden, q),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (config.vocab_size, hidden),
    }


def worker(args) -> dict:
    from hf2paged.bench import preset_config

    if args.worker == "tunableop":
        # torch's TunableOp: each GEMM shape's first call times cuBLAS and every cuBLASLt
        # algorithm and keeps the fastest (results in a file, here a temporary one)
        import tempfile

        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename(tempfile.mktemp(suffix="%d.csv"))
    else:
        torch.backends.cuda.preferred_blas_library(args.worker)
    dev = torch.device("cuda")
    n = 8192
    square = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    peak = 2 * n**3 / min(timed(lambda: square @ square, args.reps) for _ in range(3)) * 1e6
    rows = []
    for name, (out_f, in_f) in projections(preset_config(args.model)).items():
        w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
            us = timed(lambda x=x, w=w: F.linear(x, w), args.reps)
            rows.append(dict(name=name, tokens=tokens, out=out_f, inp=in_f, us=us))
        del w
    return dict(peak=peak, rows=rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--tokens", default="16,64,128,256,8192")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for lib in LIBRARIES:
        cmd = [sys.executable, __file__, "--worker", lib, "--model", args.model,
               "--tokens", ",".join(map(str, args.tokens)), "--reps", str(args.reps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{lib} failed:\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{lib}: done", flush=True)
    bw = copy_bandwidth(args.reps)
    name = torch.cuda.get_device_name()
    peaks = ", ".join(f"{lib} {r['peak'] / 1e12:.0f}" for lib, r in results.items())
    lines = [
        f"# Projection GEMMs — {args.model} shape on {name}",
        "",
        f"torch {torch.__version__}; bf16 `F.linear(x [tokens, in], w [out, in])`; matmul "
        f"peak (8192^3) TFLOP/s: {peaks}; copy bandwidth {bw:.3f} TB/s (read + write). "
        f"Median of {args.reps} CUDA-event timings, L2 flushed before each. Command: "
        f"`python benchmarks/gemm.py {' '.join(sys.argv[1:])}`.",
        "",
        "| projection (out x in) | tokens | "
        + " | ".join(f"{lib} µs | {lib} % peak | {lib} % copy bw" for lib in results)
        + " | best / cublas |",
        "|---|---:|" + "---:|---:|---:|" * len(results) + "---:|",
    ]
    by_lib = {
        lib: {(r["name"], r["tokens"]): r for r in res["rows"]} for lib, res in results.items()
    }
    for key, row in (by_lib.get("cublas") or next(iter(by_lib.values()))).items():
        flops = 2 * row["tokens"] * row["out"] * row["inp"]
        weight_bytes = 2 * row["out"] * row["inp"]
        cells = []
        for lib, rows in by_lib.items():
            us = rows[key]["us"]
            cells.append(
                f"{us:.1f} | {100 * flops / us / 1e6 / (results[lib]['peak'] / 1e12):.0f}% | "
                f"{100 * weight_bytes / us / 1e6 / bw:.0f}%"
            )
        best = min(rows[key]["us"] for rows in by_lib.values())
        base = by_lib["cublas"][key]["us"] if "cublas" in by_lib else best
        lines.append(
            f"| {row['name']} ({row['out']} x {row['inp']}) | {row['tokens']} | "
            + " | ".join(cells)
            + f" | {best / base:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"gemm-{slug}-{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
