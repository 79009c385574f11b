"""Offline throughput: hf2paged vs transformers on nano-vllm's workload (GPU; CPU smoke run).

    python benchmarks/throughput.py                      # Qwen3-0.6B shape, 256 requests, H100
    python benchmarks/throughput.py --model llama3-8b
    python benchmarks/throughput.py --quick --device cpu # smoke test

Workload (nano-vllm's bench.py): 256 requests of random token ids, input and output
lengths uniform in 100..1024 (seeded), greedy, every request generating exactly its
output length. The model has random weights in bf16 built from the real config (no hub
needed), saved once as safetensors; every system loads that same directory in its own
subprocess (clean peak-memory numbers, nothing left over from the previous system):
ours (`LLM.generate`), HF continuous batching, HF `generate` in padded static batches.
The report goes to benchmarks/results/throughput-<device>.md, rewritten after each system.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.report import Roofline, write_report  # noqa: E402
from benchmarks.runs import earlier_results, ordered, prepare_model, system_runs  # noqa: E402
from hf2paged.bench import (  # noqa: E402
    RunResult,
    format_result,
    make_workload,
    preset_config,
    run_ours,
)

SYSTEMS = ("ours", "hf-cb", "hf-generate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="qwen3-0.6b",
        choices=["qwen3-0.6b", "llama3-8b", "qwen3-30b-a3b", "tiny", "tiny-moe"],
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="keep only the first N decoder layers of the shape (same per-layer shapes; for "
        "runs whose full checkpoint does not fit the time or disk at hand; the report and "
        "its file name say so)",
    )
    p.add_argument(
        "--quick", action="store_true", help="4 short requests (8..32 tokens): a smoke test"
    )
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--tp", default="1",
        help="tensor-parallel size(s) of ours, comma-separated (e.g. 1,2: ours runs once per "
        "size); HF runs on one GPU",
    )  # fmt: skip
    p.add_argument(
        "--compile", default="auto",
        help="ours' torch.compile setting(s), comma-separated from auto,0,1 (e.g. 0,1: ours "
        "runs once per setting, HF2PAGED_COMPILE set in its worker; auto: the engine's choice)",
    )  # fmt: skip
    p.add_argument("--skip-hf", action="store_true", help="run ours only")
    p.add_argument(
        "--repeat", type=int, default=1,
        help="run ours this many times per setting, each in a fresh process; the report "
        "gives every run's row and the spread",
    )  # fmt: skip
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    p.add_argument("--num-requests", type=int, default=None, help="default 256 (4 with --quick)")
    p.add_argument("--min-len", type=int, default=None, help="default 100 (8 with --quick)")
    p.add_argument("--max-len", type=int, default=None, help="default 1024 (32 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of HF generate")
    p.add_argument(
        "--hf-generate-batches", type=int, default=0,
        help="measure HF generate on the first K static batches only (0 = all); its throughput is per batch",
    )  # fmt: skip
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="ours' token budget per step (default: the engine's, 16384 on a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--system-timeout", type=float, default=1800, help="seconds per system before it is stopped"
    )
    p.add_argument(
        "--keep-dir", type=Path, default=None,
        help="keep the random model and each system's result here; a later invocation with "
        "the same workload reuses the model and reports the earlier results beside its own "
        "(split a run longer than one job's time limit over invocations on one machine)",
    )  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default benchmarks/results/throughput-<device>.md)",
    )
    # Internal: one system's run in a subprocess.
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.num_requests = args.num_requests or (4 if quick else 256)
    args.min_len = args.min_len or (8 if quick else 100)
    args.max_len = args.max_len or (32 if quick else 1024)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown --systems {unknown}; expected a subset of {SYSTEMS}")
    args.systems = [s for s in systems if s == "ours" or not args.skip_hf]
    try:
        args.tp_sizes = [int(t) for t in str(args.tp).split(",") if t.strip()]
    except ValueError:
        p.error(f"--tp expects comma-separated integers, got {args.tp!r}")
    if not args.tp_sizes or min(args.tp_sizes) < 1:
        p.error(f"--tp expects sizes >= 1, got {args.tp!r}")
    args.tp = args.tp_sizes[0]  # a worker runs the one size it is given
    if args.repeat < 1:
        p.error(f"--repeat expects a count >= 1, got {args.repeat}")
    args.compile_settings = [c.strip() for c in args.compile.split(",") if c.strip()]
    if not args.compile_settings or set(args.compile_settings) - {"auto", "0", "1"}:
        p.error(f"--compile expects settings from auto,0,1, got {args.compile!r}")
    return args


def device_slug(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    nbytes = (1 << 30) if device.startswith("cuda") else (1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 20 if device.startswith("cuda") else 5
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync()
    bandwidth = 2 * nbytes * reps / (time.perf_counter() - start)
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the systems run next, in other processes, need it
    return bandwidth


def model_config(args: argparse.Namespace):
    """The preset shape, cut to --num-layers decoder layers where given."""
    config = preset_config(args.model)
    if args.num_layers is not None:
        if not 1 <= args.num_layers <= config.num_hidden_layers:
            raise SystemExit(
                f"--num-layers must be in 1..{config.num_hidden_layers} for {args.model}"
            )
        config.num_hidden_layers = args.num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: args.num_layers]
    return config


def model_label(args: argparse.Namespace) -> str:
    """The shape's name in reports: `qwen3-30b-a3b`, or `qwen3-30b-a3b-8l` when cut."""
    return args.model + (f"-{args.num_layers}l" if args.num_layers is not None else "")


def workload_for(args: argparse.Namespace):
    """The seeded request list; the parent and every system's worker build the same one."""
    return make_workload(
        args.num_requests, args.min_len, args.max_len, args.seed,
        model_config(args).vocab_size,
    )  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """Runs one system on the saved model and writes its RunResult as JSON."""
    workload = workload_for(args)
    dtype = getattr(torch, args.dtype)
    if args.worker == "ours":
        result = run_ours(
            model_config(args), workload, device=args.device, dtype=dtype, tp=args.tp,
            model_dir=args.model_dir, gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )  # fmt: skip
    else:
        from benchmarks.hf_baselines import load_hf_model, run_hf_continuous, run_hf_static

        model = load_hf_model(args.model_dir, dtype, args.device)
        if args.worker == "hf-cb":
            result = run_hf_continuous(model, workload)
        else:
            result = run_hf_static(
                model, workload, args.hf_batch_size, args.hf_generate_batches or None
            )
    args.result_file.write_text(result.to_json())


def run_system(
    key: str,
    system: str,
    tp: int,
    args: argparse.Namespace,
    model_dir: Path,
    tmp: Path,
    env: dict[str, str] | None = None,
) -> RunResult | str:
    """The system's result, or a one-line reason it has none (`env`: extra variables of
    its worker process)."""
    result_file = tmp / f"{key}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system]
    cmd += ["--model-dir", str(model_dir), "--result-file", str(result_file)]
    cmd += [
        "--model",
        args.model,
        *(["--num-layers", str(args.num_layers)] if args.num_layers is not None else []),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--tp",
        str(tp),
    ]
    cmd += ["--num-requests", str(args.num_requests), "--min-len", str(args.min_len)]
    cmd += ["--max-len", str(args.max_len), "--seed", str(args.seed)]
    cmd += [
        "--hf-batch-size",
        str(args.hf_batch_size),
        "--hf-generate-batches",
        str(args.hf_generate_batches),
    ]
    cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if getattr(args, "max_num_batched_tokens", None) is not None:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    )
    print(f"\n== {key}", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.system_timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {args.system_timeout:.0f} s (--system-timeout)"
    if proc.returncode != 0 or not result_file.exists():
        return f"failed (exit code {proc.returncode}; its traceback is in the log above)"
    result = RunResult.from_json(result_file.read_text())
    print(format_result(result), flush=True)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    workload = workload_for(args)
    config = model_config(args)
    dtype = getattr(torch, args.dtype)
    slug = device_slug(args.device)
    label = model_label(args)
    default_name = f"throughput-{slug}" + ("" if label == "qwen3-0.6b" else f"-{label}")
    out = args.out or REPO / "benchmarks" / "results" / (
        default_name + ("-quick" if args.quick else "") + ".md"
    )
    runs = system_runs(args)
    print(
        f"{label} ({args.dtype}) on {slug}: {len(workload)} requests, "
        f"lengths {args.min_len}..{args.max_len}, runs {[key for key, *_ in runs]}",
        flush=True,
    )
    bandwidth = copy_bandwidth(args.device)
    print(f"measured copy bandwidth: {bandwidth / 1e9:,.0f} GB/s", flush=True)
    keep = args.keep_dir.resolve() if args.keep_dir else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    workload_key = (
        f"{label}/{args.dtype}/{args.seed}/{len(workload)}/{args.min_len}-{args.max_len}/{slug}"
    )
    with tempfile.TemporaryDirectory(prefix="hf2paged-throughput-") as tmp:
        model_dir = prepare_model(args, config, dtype, keep, Path(tmp))
        roofline = Roofline.of(model_dir, config, workload, dtype, bandwidth, 1)
        results: dict[str, RunResult | str] = {}
        earlier = earlier_results(keep, workload_key)
        for key, r in earlier.items():
            if key not in {k for k, *_ in runs}:
                r.notes.append("measured by an earlier invocation on the same machine (--keep-dir)")
                results[key] = r
        for key, system, tp, env in runs:
            results[key] = run_system(key, system, tp, args, model_dir, Path(tmp), env)
            run = re.search(r"-run(\d+)$", key)
            if run and isinstance(results[key], RunResult):
                results[key].name = f"{results[key].name[:-1]}, run {run.group(1)}/{args.repeat})"
            if keep is not None and isinstance(results[key], RunResult):
                (keep / "results").mkdir(exist_ok=True)
                saved = {"workload": workload_key, "result": json.loads(results[key].to_json())}
                (keep / "results" / f"{key}.json").write_text(json.dumps(saved))
            write_report(out, args, slug, config, workload, roofline, ordered(results))
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
