"""Where a decode step's time goes (GPU): host vs device, graphs vs eager, top kernels.

    python benchmarks/profile_decode.py [--batch 256] [--prompt 512] [--model qwen3-0.6b]

Fills the engine with `--batch` requests of `--prompt` random tokens, steps until every
request decodes, then times decode steps (wall per `LLM.step`, device time of the model
forward), and prints the top CUDA kernels of a few profiled steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hf2paged.bench import preset_config, save_random_model  # noqa: E402
from runtime.engine import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    config = preset_config(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model(config, Path(tmp), torch.bfloat16, "cuda")
        llm = LLM(model_dir, dtype=torch.bfloat16, device="cuda")
        runner = llm.executor.worker.runner
        print("cuda graphs:", None if runner.graphs is None else runner.graphs.sizes)
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.steps * 4)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.batch):
            ids = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
            llm.add_request(ids, params)
        from torch.profiler import ProfilerActivity, profile

        llm.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.step()
            torch.cuda.synchronize()
        print("== one prefill step")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
        prefill_steps, t0 = 0, time.perf_counter()
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in _live(llm)):
            llm.step()
            prefill_steps += 1
        torch.cuda.synchronize()
        print(f"prefill: {prefill_steps} steps, {time.perf_counter() - t0:.2f} s")
        llm.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
        print(
            f"decode step wall (LLM.step, batch {args.batch}): {wall * 1e3:.2f} ms "
            f"-> {args.batch / wall:,.0f} tok/s"
        )
        import cProfile
        import pstats

        cprof = cProfile.Profile()
        cprof.enable()
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
        cprof.disable()
        pstats.Stats(cprof).sort_stats("tottime").print_stats(25)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                llm.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        llm.close()


def _live(llm):
    sched = llm.scheduler
    return list(sched.running) + list(sched.waiting)


if __name__ == "__main__":
    main()
