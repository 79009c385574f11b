"""TP=2 vs TP=1 greedy equivalence on GPUs (NCCL).

    python benchmarks/tp_check.py [--tp 2] [--dtype float32]      # GPUs, NCCL
    python benchmarks/tp_check.py --model tiny --device cpu          # gloo smoke check
    python benchmarks/tp_check.py --model qwen3-30b-a3b --num-layers 8 [--expert-parallel]
    python benchmarks/tp_check.py --model tiny-moe --device cpu --expert-parallel

Mixture-of-experts shapes shard every expert's intermediate dimension at TP=N, or, with
--expert-parallel, deal whole experts out to the ranks (EP=N; attention stays TP).

Builds a random Qwen3-0.6B-shaped model, generates greedily with TP=1 and TP=N on the
same prompts and reports how many requests produced identical token ids. float32 by
default (TF32 off): a bf16 all-reduce sums in another order than one GPU's GEMM, and on
random weights near-tied logits can then flip an argmax without any bug.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.throughput import model_config, model_label  # noqa: E402
from hf2paged.bench import make_workload, save_random_model  # noqa: E402
from runtime.engine import LLM, SamplingParams  # noqa: E402


def generate(
    model_dir,
    tp: int,
    dtype,
    device: str,
    prompts,
    max_tokens: int,
    enforce_eager: bool = False,
    expert_parallel: bool = False,
) -> list[list[int]]:
    llm = LLM(
        model_dir, tensor_parallel_size=tp, dtype=dtype, device=device,
        enforce_eager=enforce_eager, expert_parallel=expert_parallel and tp > 1,
    )  # fmt: skip
    try:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.close()


def generate_in_subprocess(model_dir, tp: int, args, prompts, tmp: Path) -> list[list[int]]:
    """One engine per process: the first engine's KV cache (sized to most of the free
    memory) is never in the way of the second."""
    job, result = tmp / f"job-{tp}.json", tmp / f"result-{tp}.json"
    job.write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "tp": tp,
                "dtype": args.dtype,
                "device": args.device,
                "prompts": prompts,
                "max_tokens": args.max_tokens,
                "enforce_eager": args.enforce_eager,
                "expert_parallel": args.expert_parallel,
                "hang_timeout": args.hang_timeout,
                "out": str(result),
            }
        )
    )
    subprocess.run([sys.executable, __file__, "--job", str(job)], check=True)
    return json.loads(result.read_text())


def run_job(path: str) -> None:
    job = json.loads(Path(path).read_text())
    if job["hang_timeout"]:
        # A stalled collective hangs silently: dump every thread's stack and exit instead.
        faulthandler.dump_traceback_later(job["hang_timeout"], exit=True)
    start = time.perf_counter()
    tokens = generate(
        job["model_dir"],
        job["tp"],
        getattr(torch, job["dtype"]),
        job["device"],
        job["prompts"],
        job["max_tokens"],
        job["enforce_eager"],
        job["expert_parallel"],
    )
    graphs = not job["enforce_eager"] and job["device"].startswith("cuda")
    mode = "CUDA graphs for decode" if graphs else "eager"
    ep = " EP" if job["expert_parallel"] and job["tp"] > 1 else ""
    print(f"TP={job['tp']}{ep} ({mode}): {time.perf_counter() - start:.1f} s", flush=True)
    Path(job["out"]).write_text(json.dumps(tokens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--model", default="qwen3-0.6b", help="preset shape (tiny / tiny-moe for a CPU check)"
    )
    p.add_argument("--num-layers", type=int, default=None, help="keep the first N layers")
    p.add_argument(
        "--expert-parallel", action="store_true",
        help="the TP=N engine places whole experts per rank (MoE shapes)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (both engines)")
    p.add_argument(
        "--hang-timeout", type=float, default=0,
        help="seconds before a stalled engine dumps its stacks and exits (0: never)",
    )  # fmt: skip
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        run_job(args.job)
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    config = model_config(args)
    workload = make_workload(args.num_requests, 20, 200, 1, config.vocab_size)
    prompts = [r.prompt_token_ids for r in workload]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model(config, Path(tmp) / "model", dtype, args.device)
        single = generate_in_subprocess(model_dir, 1, args, prompts, Path(tmp))
        multi = generate_in_subprocess(model_dir, args.tp, args, prompts, Path(tmp))
    same = sum(a == b for a, b in zip(single, multi))
    print(
        f"{model_label(args)}: TP={args.tp}{' EP' if args.expert_parallel else ''} vs TP=1 "
        f"({args.dtype}, greedy, {args.max_tokens} tokens): "
        f"{same}/{len(prompts)} requests identical"
    )
    for i, (a, b) in enumerate(zip(single, multi)):
        if a != b:
            k = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
            print(f"  request {i}: first difference at token {k}")
    sys.exit(0 if same == len(prompts) else 1)


if __name__ == "__main__":
    main()
