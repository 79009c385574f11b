"""Per-step trace of the throughput workload (GPU): where the engine's wall time goes.

    python benchmarks/step_trace.py [--model qwen3-0.6b] [--num-requests 256]

Runs the nano-vllm workload through `LLM.step` and groups steps into decode-only (CUDA
graph) and mixed (prefill chunks +/- decodes) steps: count, total wall time, tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hf2paged.bench import make_workload, preset_config, save_random_model  # noqa: E402
from runtime.engine import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = p.parse_args()
    config = preset_config(args.model)
    workload = make_workload(args.num_requests, 100, 1024, 0, config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model(config, Path(tmp), torch.bfloat16, "cuda")
        kw = {}
        if args.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = args.max_num_batched_tokens
        llm = LLM(model_dir, dtype=torch.bfloat16, device="cuda", **kw)
        llm.generate([workload[0].prompt_token_ids], SamplingParams(temperature=0, max_tokens=4))
        sched = llm.scheduler
        original = sched.schedule
        last = {}

        def traced():
            out = original()
            last["out"] = out
            return out

        sched.schedule = traced
        for r in workload:
            llm.add_request(
                r.prompt_token_ids,
                SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.max_tokens),
                detokenize=False,
            )
        stats = defaultdict(lambda: [0, 0.0, 0, 0])  # steps, seconds, tokens, seqs
        timeline = []
        start = time.perf_counter()
        while llm.has_unfinished_requests():
            t0 = time.perf_counter()
            llm.step()
            dt = time.perf_counter() - t0
            out = last["out"]
            kind = "decode" if all(n == 1 for n in out.num_new_tokens) else "mixed"
            s = stats[kind]
            s[0] += 1
            s[1] += dt
            s[2] += out.num_tokens
            s[3] += len(out.seqs)
            timeline.append((time.perf_counter() - start, kind, len(out.seqs), out.num_tokens, dt))
        total = time.perf_counter() - start
        print(f"total {total:.2f} s, {len(timeline)} steps")
        for kind, (n, sec, tok, seqs) in stats.items():
            print(
                f"{kind:7s}: {n} steps, {sec:.2f} s ({sec / n * 1e3:.2f} ms/step), "
                f"{tok} tokens, avg {seqs / n:.1f} seqs/step"
            )
        for i in range(0, len(timeline), max(1, len(timeline) // 25)):
            t, kind, nseq, ntok, dt = timeline[i]
            print(
                f"  t={t:6.2f}s {kind:6s} seqs={nseq:3d} tokens={ntok:5d} step={dt * 1e3:6.2f} ms"
            )
        llm.close()


if __name__ == "__main__":
    main()
