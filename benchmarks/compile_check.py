"""The compiled model path and fresh-prompt attention on a GPU, checked and timed in one run.

    PYTHONPATH=. python benchmarks/compile_check.py --model-dir DIR   # DIR: a saved model
    PYTHONPATH=. python benchmarks/compile_check.py --smoke           # CPU: tiny model, aot_eager

1. Correctness. The generated model of DIR (benchmarks/throughput.py's random Qwen3-0.6B
   shape, `--keep-dir`) runs one step sequence (three fresh prompts, one of them past the
   cuDNN threshold; their decodes beside a new prompt; decodes) three ways: eager in fp32
   (the reference), eager in the run's dtype, compiled in it. The compiled logits must be
   as close to the reference as the eager ones (relative error at most 1.5x eager's plus
   1e-3) and agree on most argmaxes; a decode replayed from a CUDA graph of the compiled
   model must match the compiled forward.
2. Compile time: the first compiled call (a full decode batch, as the engine's warm-up
   makes it), cold unless Inductor's cache already holds the graph.
3. Step times on the GPU (CUDA events): a decode step of 256 sequences replayed from a
   CUDA graph, and a mixed step of about 8k tokens (8 prompts of 1000 + 192 decodes) run
   eagerly by the runner, each for the eager and the compiled model.
4. Fresh-prompt prefill: the paged prefill kernel vs the cuDNN handoff
   (runtime/attention/sdpa_prefill.py) vs SDPA's cuDNN on contiguous K/V, for single
   prompts of 256..4096 tokens and batches of prompts (the threshold's evidence).

Writes `benchmarks/results/compile-<device>.md` (or --out) and prints it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from torch._dynamo.utils import counters  # noqa: E402

from runtime.engine.build_model import build_model  # noqa: E402
from runtime.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from runtime.engine.model_runner import ModelRunner  # noqa: E402
from runtime.engine.step_inputs import StepInputs  # noqa: E402
from runtime.kv_cache import allocate_kv_caches  # noqa: E402

BLOCK = 16


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


class Steps:
    """A step sequence over consecutive block ranges: sequences get their blocks once
    and keep them, so each runner replays identical cache traffic."""

    vocab = 1000  # token ids drawn below this (every preset's vocabulary is larger)

    def __init__(self, lengths: list[int], reserve: int) -> None:
        per_seq = -(-reserve // BLOCK)
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lengths))]
        self.context = [0] * len(lengths)
        self.num_blocks = per_seq * len(lengths)

    def step(self, new: dict[int, int], seed: int) -> StepInputs:
        """Sequences `new` (index -> new tokens) advance; token ids are random."""
        ids = sorted(new)
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab, (sum(new.values()),), generator=gen).tolist()
        step = StepInputs.build(
            [self.tables[i] for i in ids], [self.context[i] for i in ids],
            [new[i] for i in ids], BLOCK, tokens,
        )  # fmt: skip
        for i in ids:
            self.context[i] += new[i]
        return step


def correctness_steps(smoke: bool) -> tuple[Steps, list[StepInputs]]:
    prompts = [9, 17, 30, 5] if smoke else [300, 700, 1100, 50]
    steps = Steps(prompts, max(prompts) + 64)
    seq = [steps.step({0: prompts[0], 1: prompts[1], 2: prompts[2]}, 1)]
    seq.append(steps.step({0: 1, 1: 1, 2: 1, 3: prompts[3]}, 2))  # decodes + a new prompt
    for k in range(4):
        seq.append(steps.step({0: 1, 1: 1, 2: 1, 3: 1}, 3 + k))  # decodes
    return steps, seq


def run_correctness(model_dir, dtype, device, backend, smoke: bool, say) -> dict:
    steps, seq = correctness_steps(smoke)
    outs = {}
    timings = {}
    for name, mdtype, compile in (
        ("fp32 eager", torch.float32, False),
        ("eager", dtype, False),
        ("compiled", dtype, backend),
    ):
        model = build_model(model_dir, mdtype, device)
        caches = allocate_kv_caches(model, steps.num_blocks, BLOCK, mdtype, device)
        runner = ModelRunner(model, caches, device, compile=compile)
        logits = []
        with torch.inference_mode():
            for i, step in enumerate(seq):
                start = time.perf_counter()
                logits.append(runner.execute(step).float())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if compile and i == 0:
                    timings["first compiled call (prefill, 3 prompts)"] = (
                        time.perf_counter() - start
                    )
            if compile and device.type == "cuda":
                # a decode replayed from a CUDA graph of the compiled model
                decode = steps.step({0: 1, 1: 1, 2: 1, 3: 1}, 99)
                graphs = DecodeGraphs(runner, 4, steps.num_blocks * BLOCK)
                graphs.sizes, graphs.max_bs = [4], 4
                graphs.capture_all(steps.num_blocks * BLOCK, lambda ok: ok)
                runner.graphs = graphs
                replayed = runner.execute(decode).float()
                runner.graphs = None
                direct = runner.execute(decode).float()  # the same step, not replayed
                outs["graph replay vs compiled forward"] = rel_err(replayed, direct)
                graphs.release()
        outs[name] = logits
        del runner, caches, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        steps, seq = correctness_steps(smoke)  # fresh contexts for the next runner
    ref = outs["fp32 eager"]
    rows = []
    ok = True
    for i in range(len(ref)):
        e, c = rel_err(outs["eager"][i], ref[i]), rel_err(outs["compiled"][i], ref[i])
        agree_e = (outs["eager"][i].argmax(-1) == ref[i].argmax(-1)).float().mean().item()
        agree_c = (outs["compiled"][i].argmax(-1) == ref[i].argmax(-1)).float().mean().item()
        good = c <= 1.5 * e + 1e-3 and agree_c >= min(agree_e, 1.0) - 0.34
        ok &= good
        rows.append(
            f"| {i} | {tuple(ref[i].shape)} | {e:.2e} | {c:.2e} | {agree_e:.2f} | {agree_c:.2f} "
            f"| {'ok' if good else 'FAIL'} |"
        )
    graph_err = outs.get("graph replay vs compiled forward")
    if graph_err is not None:
        ok &= graph_err < 1e-2
    say(
        "",
        "## 1. Correctness (logits vs fp32 eager)",
        "",
        "| step | logits | eager rel. err | compiled rel. err | eager argmax agree "
        "| compiled argmax agree | |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"CUDA-graph replay of the compiled model vs its forward: rel. err {graph_err:.2e}"
        if graph_err is not None
        else "(no CUDA-graph replay check on this device)",
        f"Traced graphs: {counters['stats'].get('unique_graphs', 0)}; graph breaks: "
        f"{dict(counters['graph_break']) or 'none'}. Verdict: {'PASS' if ok else 'FAIL'}.",
    )
    return timings


def cuda_time(fn, reps: int) -> float:
    """Median ms of fn() over reps (CUDA events), after one warm call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_step_times(model_dir, dtype, device, say) -> dict:
    decode_ctx, batch, prompt, num_prompts = 600, 256, 1000, 8
    lengths = [decode_ctx + 8] * batch + [prompt + 8] * num_prompts
    steps = Steps(lengths, max(lengths))
    model = build_model(model_dir, dtype, device)
    caches = allocate_kv_caches(model, steps.num_blocks, BLOCK, dtype, device)
    for cache in caches:
        cache.normal_()  # cached context: random keys and values
    for i in range(batch):
        steps.context[i] = decode_ctx
    decode = steps.step(dict.fromkeys(range(batch), 1), 5)
    for i in range(batch):
        steps.context[i] -= 1
    mixed_new = dict.fromkeys(range(batch - 64), 1) | {
        batch + j: prompt for j in range(num_prompts)
    }
    mixed = steps.step(mixed_new, 6)
    results = {}
    compile_s = None
    for name, compile in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        runner = ModelRunner(model, caches, device, compile=compile)
        with torch.inference_mode():
            if compile:  # the engine's warm-up traces on a full decode batch first
                start = time.perf_counter()
                runner.execute(decode)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
            graphs = DecodeGraphs(runner, batch, max(lengths) + 16)
            graphs.sizes, graphs.max_bs = [batch], batch
            graphs.capture_all(max(lengths) + 16, lambda ok: ok)
            runner.graphs = graphs
            results[f"decode {batch} (CUDA graph), {name}"] = cuda_time(
                lambda r=runner: r.execute(decode), 30
            )
            runner.graphs = None
            graphs.release()
            results[f"mixed {mixed.input_ids.size} tokens, {name}"] = cuda_time(
                lambda r=runner: r.execute(mixed), 8
            )
        runner.eager()
    rows = [f"| {k} | {v:.3f} |" for k, v in results.items()]
    say(
        "",
        "## 3. Step times (ms, median; CUDA events around ModelRunner.execute)",
        "",
        "| step | ms |",
        "|---|---|",
        *rows,
        "",
        f"First compiled call in this process (decode batch of {batch}; Inductor's cache warm "
        f"from section 1): {compile_s:.1f} s.",
    )
    return results


def fresh_prompt_calls(lens: list[int]) -> dict:
    """Fresh prompts of `lens` tokens in one paged cache: the prefill kernel alone, the
    cuDNN handoff (sdpa_prefill.py) and SDPA's cuDNN on contiguous K/V, one call each."""
    from attention import DTYPE, HKV, HQ, PARAMS, SCALE, D, paged_copy
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from runtime.attention.triton_ops import paged_attention

    qs = [torch.randn(1, HQ, n, D, dtype=DTYPE, device="cuda") for n in lens]
    ks = [torch.randn(1, HKV, n, D, dtype=DTYPE, device="cuda") for n in lens]
    vs = [torch.randn(1, HKV, n, D, dtype=DTYPE, device="cuda") for n in lens]
    caches, tables, offset = [], [], 0
    for k, v in zip(ks, vs):
        cache, table = paged_copy(k, v, BLOCK)
        caches.append(cache)
        tables.append([b + offset for b in table[0]])
        offset += cache.shape[1]
    cache = torch.cat(caches, 1)
    md = StepInputs.build(tables, [0] * len(lens), lens, BLOCK).to_device("cuda").metadata
    query = torch.cat([q[0].transpose(0, 1) for q in qs]).contiguous()  # [T, Hq, D]

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for q, k, v in zip(qs, ks, vs):
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=SCALE, enable_gqa=True
                )

    return {
        "kernel": lambda: paged_attention(query, cache, md, PARAMS, sdpa_min_tokens=1 << 30),
        "handoff": lambda: paged_attention(query, cache, md, PARAMS, sdpa_min_tokens=1),
        "cudnn": sdpa,
    }


def run_prefill(say) -> None:
    from attention import HKV, HQ, D, interleaved

    cases = [[256], [512], [1024], [2048], [4096], [1024] * 8, [2048] * 4, [512] * 16]
    rows = []
    for lens in cases:
        calls = fresh_prompt_calls(lens)
        err = (calls["kernel"]().float() - calls["handoff"]().float()).abs().max().item()
        t = interleaved(calls, 20)
        flops = sum(4 * HQ * D * n * (n + 1) // 2 for n in lens)
        label = f"{len(lens)} x {lens[0]}" if len(lens) > 1 else f"{lens[0]}"
        rows.append(
            f"| {label} ({sum(lens)} tokens) | {t['kernel']:.1f} | {t['handoff']:.1f} | "
            f"{t['cudnn']:.1f} | {t['kernel'] / t['cudnn']:.2f} | {t['handoff'] / t['cudnn']:.2f} | "
            f"{flops / t['handoff'] / 1e6:.0f} | {err:.1e} |"
        )
        print(rows[-1], flush=True)
    say(
        "",
        f"## 4. Fresh-prompt prefill attention (µs; {HQ}/{HKV} heads, d{D}, bf16, block {BLOCK}; "
        "median of 3 interleaved rounds of 20, L2 flushed)",
        "",
        "| prompts | paged kernel | cuDNN handoff (paged_attention) | SDPA cuDNN, contiguous K/V "
        "| kernel / cuDNN | handoff / cuDNN | handoff TFLOP/s | max abs diff kernel vs handoff |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="a saved model (throughput.py --keep-dir)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, aot_eager, sections 1-2")
    p.add_argument("--sections", default="1,3,4")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    sections = {int(s) for s in args.sections.split(",")}
    lines: list[str] = []

    def say(*text: str) -> None:
        lines.extend(text)
        print("\n".join(text), flush=True)

    if args.smoke:
        import tempfile

        from hf2paged.bench import preset_config, save_random_model

        device, dtype, backend = torch.device("cpu"), torch.float32, "aot_eager"
        model_dir = Path(tempfile.mkdtemp(prefix="compile-check-"))
        save_random_model(preset_config("tiny"), model_dir, dtype, "cpu")
        name = "cpu"
        sections &= {1}
    else:
        device, dtype, backend = torch.device("cuda"), getattr(torch, args.dtype), True
        model_dir = args.model_dir
        name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    say(
        f"# Compiled blocks and fresh-prompt attention — {name}",
        "",
        f"torch {torch.__version__}; model {model_dir or '(none: section 4 only)'}; dtype "
        f"{dtype}. Generated by "
        "`benchmarks/compile_check.py`.",
    )
    timings: dict = {}
    if 1 in sections:
        timings |= run_correctness(model_dir, dtype, device, backend, args.smoke, say)
        say("", *(f"{k}: {v:.1f} s (section 2: compile time)" for k, v in timings.items()))
    if 3 in sections:
        run_step_times(model_dir, dtype, device, say)
    if 4 in sections:
        run_prefill(say)
    out = args.out or REPO / "benchmarks" / "results" / f"compile-{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
