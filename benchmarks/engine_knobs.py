"""The engine loop's knobs on throughput.py's workload, one engine, one process (GPU; CPU smoke).

    python benchmarks/engine_knobs.py                       # Qwen3-0.6B shape, default sweep
    python benchmarks/engine_knobs.py --configs async:8192:256,sync:8192:256
    python benchmarks/engine_knobs.py --device cpu --model tiny --num-requests 16 --max-len 64

Each configuration ``loop:budget:seqs`` is asynchronous scheduling on or off (``async`` /
``sync``), the scheduler's token budget per step (``max_num_batched_tokens``, which is also
the prefill chunk size: a prompt takes what is left of the budget) and its most sequences
per step (``max_num_seqs``). They are set on ONE engine between runs of the workload, so
the model, its KV cache (sized for the largest budget of the sweep) and its CUDA graphs
(captured for the largest ``seqs``) are the same for all, and a run costs only its own
time: this measures the knobs, throughput.py measures the engine against transformers.
Each run adds every request, then calls ``LLM.step_tokens`` until done (as throughput.py's
``ours``); it reports output tok/s, steps, preemptions, TTFT and ITL.

Writes `benchmarks/results/engine-knobs-<device>[-<model>].md`, rewritten after each run
(a run stopped by ``--time-limit`` or a device limit keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hf2paged.bench import (  # noqa: E402
    latencies_from_timestamps,
    make_workload,
    percentile,
    preset_config,
    save_random_model,
)

DEFAULT_CONFIGS = "async:8192:256,sync:8192:256,async:4096:256,async:16384:256,async:2048:256"


def parse_configs(text: str) -> list[tuple[bool, int, int]]:
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in ("async", "sync"):
            raise SystemExit(f"--configs: {item!r} is not loop:budget:seqs (loop async|sync)")
        try:
            budget, seqs = int(parts[1]), int(parts[2])
        except ValueError:
            raise SystemExit(f"--configs: {item!r} needs integer budget and seqs") from None
        if budget < 1 or seqs < 1:
            raise SystemExit(f"--configs: {item!r} needs budget and seqs >= 1")
        configs.append((parts[0] == "async", budget, seqs))
    return configs


def run_once(llm, workload, async_scheduling: bool, budget: int, seqs: int) -> dict:
    from runtime.engine import SamplingParams

    llm.async_scheduling = async_scheduling
    llm.scheduler.max_num_batched_tokens = budget
    llm.scheduler.max_num_seqs = seqs
    preemptions = llm.scheduler.num_preemptions
    if llm.executor.worker.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for r in workload:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.max_tokens)
        rid = llm.add_request(r.prompt_token_ids, params, detokenize=False)
        times[rid], tokens[rid] = [], []
    steps = 0
    while llm.has_unfinished_requests():
        deltas = llm.step_tokens()
        steps += 1
        now = time.perf_counter()
        for d in deltas:
            times[d.request_id].append(now)
            tokens[d.request_id].append(d.token_id)
    elapsed = time.perf_counter() - start
    ttft, itl = latencies_from_timestamps(start, list(times.values()))
    return dict(
        loop="async" if async_scheduling else "sync", budget=budget, seqs=seqs,
        elapsed=elapsed, tokens=sum(len(t) for t in times.values()), steps=steps,
        outputs=list(tokens.values()),
        preemptions=llm.scheduler.num_preemptions - preemptions,
        ttft50=percentile(ttft, 50), ttft99=percentile(ttft, 99),
        itl50=percentile(itl, 50), itl99=percentile(itl, 99),
    )  # fmt: skip


def write_report(out: Path, args, device_name: str, rows: list[dict], note: str) -> None:
    lines = [
        f"# Engine knobs — {args.model} shape on {device_name}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}. Command: `python benchmarks/engine_knobs.py "
        f"{' '.join(sys.argv[1:])}`. Workload: throughput.py's ({args.num_requests} requests, "
        f"lengths {args.min_len}..{args.max_len}, seed {args.seed}, greedy, ids only), ours "
        "only, one engine for every row (same weights, KV cache and CUDA graphs). " + note,
        "",
        "| loop | token budget (chunk) | max seqs | output tok/s | s | steps | preemptions "
        "| TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | outputs = row 1's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = sum(a == b for a, b in zip(r["outputs"], rows[0]["outputs"]))
        lines.append(
            f"| {r['loop']} | {r['budget']} | {r['seqs']} | {r['tokens'] / r['elapsed']:,.0f} | "
            f"{r['elapsed']:.2f} | {r['steps']} | {r['preemptions']} | "
            f"{r['ttft50'] * 1e3:,.0f} / {r['ttft99'] * 1e3:,.0f} | "
            f"{r['itl50'] * 1e3:.1f} / {r['itl99'] * 1e3:.1f} | {same} / {len(r['outputs'])} |"
        )
    lines += [
        "",
        "Last column: requests whose greedy tokens equal those of the first row. The same "
        "schedule gives the same tokens; in bf16 another batch composition (token budget, "
        "the step a finished request's blocks come back) may flip a near-tie.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="qwen3-0.6b", choices=["qwen3-0.6b", "llama3-8b", "tiny"])
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated loop:budget:seqs")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None, help="a saved model (else built)")
    p.add_argument(
        "--time-limit", type=float, default=None,
        help="seconds: start no further run once this much time has passed",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    configs = parse_configs(args.configs)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    begin = time.perf_counter()
    config = preset_config(args.model)
    workload = make_workload(
        args.num_requests, args.min_len, args.max_len, args.seed, config.vocab_size
    )
    name = torch.cuda.get_device_name() if cuda else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    suffix = "" if args.model == "qwen3-0.6b" else f"-{args.model}"
    out = args.out or REPO / "benchmarks" / "results" / f"engine-knobs-{slug}{suffix}.md"
    from runtime.engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory(prefix="engine-knobs-") as tmp:
        model_dir = args.model_dir or save_random_model(config, Path(tmp), dtype, args.device)
        kw = {} if cuda else dict(kv_cache_memory_bytes=1 << 30)
        llm = LLM(
            model_dir, dtype=dtype, device=args.device,
            max_num_batched_tokens=max(b for _, b, _ in configs),
            max_num_seqs=max(s for _, _, s in configs), **kw,
        )  # fmt: skip
        note = (
            f"KV cache: {llm.block_manager.num_blocks} blocks of {llm.config.block_size} "
            f"(sized for budget {llm.config.max_num_batched_tokens})."
        )
        print(f"engine ready after {time.perf_counter() - begin:.0f} s; {note}", flush=True)
        warm = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)
        llm.generate([r.prompt_token_ids for r in workload[:4]], warm, use_tqdm=False)
        rows = []
        try:
            for async_scheduling, budget, seqs in configs:
                if args.time_limit is not None and time.perf_counter() - begin > args.time_limit:
                    print("--time-limit reached: the remaining configurations are not run")
                    break
                row = run_once(llm, workload, async_scheduling, budget, seqs)
                rows.append(row)
                print(
                    f"{row['loop']} budget {budget} seqs {seqs}: "
                    f"{row['tokens'] / row['elapsed']:,.0f} output tok/s "
                    f"({row['elapsed']:.2f} s, {row['steps']} steps)",
                    flush=True,
                )
                write_report(out, args, name, rows, note)
        finally:
            llm.close()
    print(f"report: {out}")


if __name__ == "__main__":
    main()
