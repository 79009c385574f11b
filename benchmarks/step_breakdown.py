"""Where one engine step's time goes: a steady decode step and a mixed step at batch 256.

    python benchmarks/step_breakdown.py                   # GPU: CUDA graphs on and off, + host alone
    python benchmarks/step_breakdown.py --modes host      # host side alone (any machine, no GPU)
    python benchmarks/step_breakdown.py --device cpu --model tiny --num-requests 16 --steps 40
                                                          # CPU smoke of the whole pipeline

The throughput workload (`benchmarks/throughput.py`: nano-vllm's 256 requests, lengths
100..1024, greedy, random bf16 weights of the Qwen3-0.6B shape) runs through
`LLM.step_tokens` (as throughput.py drives it) for ``--steps`` steps, each mode in its own
process, with asynchronous scheduling unless ``--sync``:

- ``graphs`` / ``eager``: the engine as served, CUDA graphs on / off. Every step is timed
  by phase on the host (perf_counter around the engine's own calls: scheduling, input
  preparation, upload, model launch, logits, sampling, the wait for the GPU, the
  scheduler's update, the per-request outputs; what is left is Python between them).
  The wait is the engine's own: the sampled ids' copy to the host (an event), which
  separates host work from GPU time (with async scheduling, the wait for the step
  before, while this call's step is already queued). One mixed
  step (prompt chunks beside ~all sequences decoding) and one steady decode step at the
  full batch run under the torch profiler with every module's forward marked; its trace
  attributes each GPU kernel to the innermost module (norms, GEMMs, attention, rotary,
  activation, residual adds...), counts launch and sync calls, and measures GPU busy
  time. A CUDA-graph replay shows kernels but no modules: they are matched in order to
  an eager forward of the same captured batch.
- ``host``: the same engine with the model and the sampler stubbed (the tiny model on
  the CPU; inputs are still built): the host's share alone, measurable on any machine.
  Its ratio to the GPU step says what overlapping the host with the GPU can recover.

Writes `benchmarks/results/step-breakdown-<device>.md` (or ``--out``); a section after
the line ``<!-- kept -->`` in an existing report survives a rewrite (the plan).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

KEEP_MARK = "<!-- kept -->"
MODES = ("graphs", "eager", "host")

# ----------------------------------------------------------------------------- phases


class Phases:
    """Exclusive host time per phase of the current step (nested phases subtract)."""

    def __init__(self, ranges: bool = True) -> None:
        self.stack: list[list] = []  # [name, start, child time]
        self.step: dict[str, float] = defaultdict(float)
        self.ranges = ranges  # profiler ranges around the phases (off: --light)

    def push(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        name, start, children = self.stack.pop()
        total = time.perf_counter() - start
        self.step[name] += total - children
        if self.stack:
            self.stack[-1][2] += total

    def wrap(self, obj, attr: str, name: str, before=None) -> None:
        """Time ``obj.attr`` (a method or callable) as phase ``name``, under a profiler
        range ``host::name``; ``before`` runs first, as its own phase."""
        fn = getattr(obj, attr)
        phases = self

        def timed(*args, **kwargs):
            if before is not None:
                before()
            phases.push(name)
            try:
                if not phases.ranges:
                    return fn(*args, **kwargs)
                with torch.profiler.record_function(f"host::{name}"):
                    return fn(*args, **kwargs)
            finally:
                phases.pop()

        setattr(obj, attr, timed)


class _StubSampler:
    """Host mode: token 1 for every row, as device tensors like the real sampler's."""

    def sample(self, logits, seqs):
        from runtime.engine.sampler import SamplerOutput

        return SamplerOutput(torch.ones(len(seqs), dtype=torch.int64))


def instrument(llm, phases: Phases, host_only: bool) -> None:
    """Wrap the engine's calls of one step (the names `LLM._step` and the runner use)."""
    import runtime.engine.llm as llm_module
    from runtime.engine.sampler import SamplerOutput

    phases.wrap(llm.scheduler, "schedule", "schedule")
    phases.wrap(llm_module, "prepare_step", "prepare inputs")
    runner = llm.executor.worker.runner
    phases.wrap(runner, "upload", "upload")
    phases.wrap(runner, "tensors", "input metadata")
    if host_only:
        # The model and sampler are not measured here: inputs are built, nothing runs.
        llm.executor.execute = lambda inputs: runner.tensors(inputs) and None
        llm.sampler = _StubSampler()
    else:
        if runner.graphs is not None:
            phases.wrap(runner.graphs, "run", "graph inputs + replay")
        model = runner.model
        model.register_forward_pre_hook(lambda *a: phases.push("model launch"))
        model.register_forward_hook(lambda *a: phases.pop())
        phases.wrap(model, "compute_logits", "logits launch")
    phases.wrap(llm.sampler, "sample", "sample")
    # Where the host waits for the device: the sampled ids' copy (one event per step).
    # Under async scheduling it waits for the step launched by the call before.
    phases.wrap(SamplerOutput, "tolists", "GPU wait")
    phases.wrap(llm.executor, "execute", "execute (rest)")
    phases.wrap(llm.scheduler, "update", "scheduler update")
    # Per step, not per request (a range per request would cost more than it measures):
    # step_tokens' exclusive time is building the per-request deltas around `_step`.
    phases.wrap(llm, "_step", "engine Python (between phases)")
    phases.wrap(llm, "step_tokens", "request outputs")


# ----------------------------------------------------------------------------- worker


def next_step_kind(llm) -> tuple[str, int]:
    """(kind, approximate batch) of the step the scheduler will make next."""
    sched = llm.scheduler
    running = sched.running
    admit = min(len(sched.waiting), max(0, sched.max_num_seqs - len(running)))
    mixed = bool(sched.waiting) or any(s.num_uncomputed_tokens > 1 for s in running)
    return ("mixed" if mixed else "decode"), len(running) + admit


class ModuleMarks:
    """Profiler ranges ``mod::<class>`` around every module's forward while installed."""

    def __init__(self) -> None:
        self.handles = []
        self.open: list = []

    def __enter__(self):
        from torch.nn.modules import module

        def pre(mod, args):
            rf = torch.profiler.record_function(f"mod::{type(mod).__name__}")
            rf.__enter__()
            self.open.append(rf)

        def post(mod, args, out):
            self.open.pop().__exit__(None, None, None)

        self.handles = [
            module.register_module_forward_pre_hook(pre),
            module.register_module_forward_hook(post),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def profile_step(llm, trace_dir: Path, label: str) -> tuple[dict, Path]:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    path = trace_dir / f"{label}.json"
    with ModuleMarks(), profile(activities=acts) as prof:
        with torch.profiler.record_function("step"):
            llm.step_tokens()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return analyse_trace(path), path


def eager_reference(runner, bs: int, max_seq_len: int, trace_dir: Path) -> list[tuple[str, str]]:
    """(kernel name, category) in launch order of one eager forward of the captured
    decode batch ``bs`` (what its CUDA graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    g = runner.graphs
    args = (g.input_ids[:bs], g.positions[:bs], runner.kv_caches, g.metadata(bs, max_seq_len))
    path = trace_dir / "eager-reference.json"
    with (
        torch.inference_mode(),
        ModuleMarks(),
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
        with torch.profiler.record_function("step"):
            runner.model(*args)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    kernels = attributed_kernels(events)
    return [(k["name"], k["category"]) for k in sorted(kernels, key=lambda k: k["ts"])]


def worker(args) -> dict:
    from hf2paged.bench import make_workload, preset_config
    from runtime.engine import LLM, SamplingParams

    host_only = args.worker == "host"
    device = "cpu" if host_only else args.device
    config = preset_config(args.model)
    workload = make_workload(args.num_requests, 100, 1024, 0, config.vocab_size)
    kw = dict(max_num_batched_tokens=args.max_num_batched_tokens)
    if host_only or device == "cpu":
        kw["kv_cache_memory_bytes"] = 1 << 30
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    llm = LLM(
        args.model_dir, dtype=dtype, device=device, enforce_eager=args.worker == "eager",
        async_scheduling=not args.sync, **kw,
    )  # fmt: skip
    greedy = lambda n: SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n)  # noqa: E731
    if not host_only:
        llm.generate([r.prompt_token_ids for r in workload[:4]], greedy(8), use_tqdm=False)
    for r in workload:
        llm.add_request(r.prompt_token_ids, greedy(r.max_tokens), detokenize=False)
    phases = Phases(ranges=not args.light)
    instrument(llm, phases, host_only)
    last = {}
    schedule = llm.scheduler.schedule

    def traced():
        out = schedule()
        last["out"] = out
        return out

    llm.scheduler.schedule = traced
    trace_dir = Path(tempfile.mkdtemp(prefix="step-breakdown-"))
    steps, profiled, full = [], {}, 0.9 * args.num_requests
    steady = 0
    limit = args.steps if args.worker == "eager" else args.steps_full
    for i in range(limit or 10**9):
        if not llm.has_unfinished_requests():
            break
        kind, batch = next_step_kind(llm)
        want = None
        if not host_only and not args.light:
            running = len(llm.scheduler.running)
            if (
                kind == "mixed"
                and running >= 0.8 * args.num_requests
                and profiled.get("n_mixed", 0) < 2
            ):
                want = "mixed"
            elif kind == "decode" and batch >= full:
                steady += 1
                if steady == 6:
                    want = "decode"
        if want is not None:
            t0 = time.perf_counter()
            summary, path = profile_step(llm, trace_dir, f"{args.worker}-{want}-{i}")
            out = last["out"]
            steps.append(dict(kind=want, batch=len(out.seqs), tokens=out.num_tokens,
                              sampled=sum(out.sample), wall=time.perf_counter() - t0,
                              phases={}, profiled=True))  # fmt: skip
            summary["batch"] = len(last["out"].seqs)
            summary["tokens"] = last["out"].num_tokens
            profiled[f"n_{want}"] = profiled.get(f"n_{want}", 0) + 1
            if want not in profiled or summary["batch"] >= profiled[want]["batch"]:
                profiled[want] = summary
                profiled[want + "_trace"] = str(path)
            if want == "decode" and llm.executor.worker.runner.graphs is not None:
                runner = llm.executor.worker.runner
                bs = next(s for s in runner.graphs.sizes if s >= summary["batch"])
                ref = eager_reference(
                    runner, bs, max(s.num_tokens for s in last["out"].seqs), trace_dir
                )
                relabel_graph_kernels(profiled["decode"], ref)
            continue
        phases.step.clear()
        t0 = time.perf_counter()
        llm.step_tokens()
        wall = time.perf_counter() - t0
        out = last["out"]
        kind = "decode" if all(n == 1 for n in out.num_new_tokens) else "mixed"
        steps.append(dict(kind=kind, batch=len(out.seqs), tokens=out.num_tokens,
                          sampled=sum(out.sample), wall=wall, phases=dict(phases.step)))  # fmt: skip
    truncated = llm.has_unfinished_requests()
    llm.close()
    result = dict(mode=args.worker, device=device, steps=steps, truncated=truncated)
    for kind in ("decode", "mixed"):
        if kind in profiled:
            result[f"profile_{kind}"] = profiled[kind]
    if args.trace_out:
        for kind in ("decode", "mixed"):
            src = profiled.get(kind + "_trace")
            if src:
                dst = Path(args.trace_out) / f"trace-{args.worker}-{kind}.json.gz"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(gzip.compress(Path(src).read_bytes()))
    return result


# ----------------------------------------------------------------------------- traces

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")  # fmt: skip
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaStreamWaitEvent")  # fmt: skip
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


GEMM = "GEMM (projections, LM head)"
NORMS = "norms (RMSNorm / LayerNorm)"
ACTIVATION = "activation (SiLU-and-mul)"
ATTENTION_OWN_OPS = "rotary + q/k/v reshapes (attention module's own ops)"
RESIDUAL = "residual adds"
GLUE = "other model glue (gather of logits rows, casts)"

# (pattern, share), first match wins. By kernel name: library GEMMs and the attention
# kernels anywhere; torch.compile's fused kernels (``triton_*``), named after the ops they
# fuse. By the innermost module's class name: the same for every generated architecture.
LIBRARY_KERNELS = [
    (r"(?i)nvjet|gemm|cutlass|splitKreduce|xmma", GEMM),
    (r"reshape_and_cache", "attention: KV-cache write"),
    (r"paged_(decode|prefill)|decode_reduce|flash|cudnn|fmha", "attention: kernels"),
]
FUSED_KERNELS = [
    (r"rsqrt", NORMS),
    (r"silu|gelu|sigmoid", ACTIVATION),
    (r"cat_mul_neg|neg_cat|rotary|cos|sin", ATTENTION_OWN_OPS),
    (r"add", RESIDUAL),
]
MODULES = [
    (r"Linear|LMHead", GEMM),
    (r"Norm", NORMS),
    (r"Rotary", "rotary (cos/sin tables)"),
    (r"Attention", ATTENTION_OWN_OPS),
    (r"MLP|FeedForward|FFN", ACTIVATION),
    (r"Embedding", "embedding"),
    (r"DecoderLayer|Block|Layer$", RESIDUAL),
]


def _first_match(table: list[tuple[str, str]], text: str) -> str | None:
    return next((share for pattern, share in table if re.search(pattern, text)), None)


def kernel_category(kernel: str) -> str | None:
    """The share a kernel's name alone tells: library GEMMs, the attention kernels, and
    torch.compile's fused kernels (named after the ops they fuse), which run inside a
    compiled block, where no module range marks what they do, or replay in a CUDA graph."""
    share = _first_match(LIBRARY_KERNELS, kernel)
    if share is None and kernel.startswith("triton_"):
        share = _first_match(FUSED_KERNELS, kernel)
    return share


def category_of(scopes: list[str], kernel: str) -> str:
    """The share a GPU kernel belongs to, from its name where that says (see
    `kernel_category`), else from the module / host-phase ranges it was launched in
    (innermost first)."""
    mods = [s[5:] for s in scopes if s.startswith("mod::")]
    host = [s[6:] for s in scopes if s.startswith("host::")]
    if "sample" in host:
        return "sampling"
    by_name = kernel_category(kernel)
    if by_name is not None:
        return by_name
    if not mods:
        if host and host[0] in ("upload", "input metadata", "graph inputs + replay"):
            return "input upload / copies"
        if host and host[0] == "logits launch":
            return GLUE
        return "other (outside the model)"
    if "PagedAttention" in mods:
        return "attention: layout copies, index uploads"
    return _first_match(MODULES, mods[0]) or GLUE


def _innermost(ranges_by_tid, tid, ts) -> list[str]:
    found = [r for r in ranges_by_tid.get(tid, ()) if r[0] <= ts <= r[1]]
    found.sort(key=lambda r: -r[0])
    return [r[2] for r in found]


def attributed_kernels(events: list[dict]) -> list[dict]:
    """GPU activities with the ranges their launch call sits in and a category."""
    ranges = defaultdict(list)
    runtime = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat == "user_annotation":
            ranges[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                runtime[corr] = e
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATS:
            continue
        launch = runtime.get(e.get("args", {}).get("correlation"))
        scopes = _innermost(ranges, launch["tid"], launch["ts"]) if launch else []
        name = e["name"]
        out.append(dict(
            name=name, ts=e["ts"], dur=e["dur"], scopes=scopes,
            graph=bool(launch and launch["name"] == "cudaGraphLaunch"),
            category=category_of(scopes, name),
        ))  # fmt: skip
    return out


def analyse_trace(path: Path) -> dict:
    events = json.loads(path.read_text())["traceEvents"]
    step = next(e for e in events if e.get("cat") == "user_annotation" and e["name"] == "step")
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    kernels = [k for k in attributed_kernels(events) if k["ts"] < t1 + 1e4]
    intervals = sorted((k["ts"], k["ts"] + k["dur"]) for k in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in intervals:  # union of GPU activity
        if b > end:
            busy += b - max(a, end)
            end = b
    calls = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            if t0 <= e["ts"] <= t1:
                calls[e["name"]][0] += 1
                calls[e["name"]][1] += e["dur"]
    phases = defaultdict(float)
    for e in events:
        if e.get("cat") == "user_annotation" and e["name"].startswith("host::"):
            phases[e["name"][6:]] += e["dur"]
    return dict(
        wall_us=step["dur"],
        gpu_busy_us=busy,
        gpu_span_us=(max(b for _, b in intervals) - t0) if intervals else 0.0,
        kernels=[{k: v for k, v in x.items() if k != "scopes"} for x in kernels],
        calls={k: v for k, v in calls.items()},
        phases_us=dict(phases),
    )


def relabel_graph_kernels(summary: dict, reference: list[tuple[str, str]]) -> None:
    """Give the kernels a CUDA graph replayed the categories of the same kernels, in the
    same order, in an eager forward of the captured batch."""
    replayed = [k for k in summary["kernels"] if k["graph"]]
    replayed.sort(key=lambda k: k["ts"])
    matched = 0
    for k, (name, category) in zip(replayed, reference):
        if k["name"] == name:
            k["category"] = category
            matched += 1
    summary["graph_kernels"] = len(replayed)
    summary["graph_kernels_matched"] = matched


# ----------------------------------------------------------------------------- report


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _quantile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def steady_steps(result: dict, num_requests: int) -> dict[str, list[dict]]:
    full = 0.9 * num_requests
    timed = [s for s in result["steps"] if not s.get("profiled")]
    return {
        "decode": [s for s in timed if s["kind"] == "decode" and s["batch"] >= full],
        "mixed": [s for s in timed if s["kind"] == "mixed" and s["batch"] >= 0.5 * num_requests],
    }


PHASE_ORDER = ["schedule", "prepare inputs", "upload", "input metadata", "execute (rest)",
               "model launch", "graph inputs + replay", "logits launch", "sample", "GPU wait",
               "scheduler update", "engine Python (between phases)", "request outputs"]  # fmt: skip


def host_table(results: dict, num_requests: int) -> list[str]:
    cols = []
    for mode, res in results.items():
        for kind, steps in steady_steps(res, num_requests).items():
            if steps:
                cols.append((f"{mode}, {kind}", steps))
    if not cols:
        return []
    lines = [
        "| phase (ms per step, median) | " + " | ".join(c for c, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    names = [p for p in PHASE_ORDER if any(p in s["phases"] for _, st in cols for s in st)]
    for name in names:
        vals = [_median([s["phases"].get(name, 0.0) * 1e3 for s in st]) for _, st in cols]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    rest = []
    host = []
    for _, st in cols:
        rest.append(_median([(s["wall"] - sum(s["phases"].values())) * 1e3 for s in st]))
        host.append(_median([(s["wall"] - s["phases"].get("GPU wait", 0.0)) * 1e3 for s in st]))
    lines.append(
        "| unaccounted (the benchmark's loop) | " + " | ".join(f"{v:.2f}" for v in rest) + " |"
    )
    lines.append(
        "| step wall, fastest 10% (p10) | "
        + " | ".join(f"{_quantile([s['wall'] * 1e3 for s in st], 0.1):.2f}" for _, st in cols)
        + " |"
    )
    lines.append(
        "| **step wall** | "
        + " | ".join(f"**{_median([s['wall'] * 1e3 for s in st]):.2f}**" for _, st in cols)
        + " |"
    )
    lines.append("| host work (wall - GPU wait) | " + " | ".join(f"{v:.2f}" for v in host) + " |")
    lines.append(
        "| steps (batch, tokens: median) | "
        + " | ".join(
            f"{len(st)} ({_median([s['batch'] for s in st]):.0f}, {_median([s['tokens'] for s in st]):.0f})"
            for _, st in cols
        )
        + " |"
    )
    return lines


BUCKETS = ((192, "decode, batch >= 192"), (128, "decode, batch 128..191"),
           (64, "decode, batch 64..127"), (16, "decode, batch 16..63"), (0, "decode, batch < 16"))  # fmt: skip


def run_table(results: dict) -> list[str]:
    """Where a whole run's time goes: mixed steps, and decode steps by batch size."""
    lines = []
    for mode, res in results.items():
        steps = res["steps"]
        if not steps or res.get("truncated"):
            continue
        groups = defaultdict(list)
        for s in steps:
            if s["kind"] == "mixed":
                groups["mixed (prompt chunks + decodes)"].append(s)
            else:
                groups[next(name for lo, name in BUCKETS if s["batch"] >= lo)].append(s)
        total = sum(s["wall"] for s in steps)
        tokens = sum(s["sampled"] for s in steps)
        lines += [
            f"{mode}: {len(steps)} steps, {total:.2f} s, {tokens:,} sampled tokens "
            f"({tokens / total:,.0f} tok/s with the instrumentation's per-step sync; "
            f"{sum(bool(s.get('profiled')) for s in steps)} steps ran under the profiler).",
            "",
            "| steps | count | seconds | % of run | ms per step (median) | sampled tokens | tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        order = ["mixed (prompt chunks + decodes)"] + [name for _, name in BUCKETS]
        for name in order:
            st = groups.get(name)
            if not st:
                continue
            sec = sum(s["wall"] for s in st)
            tok = sum(s["sampled"] for s in st)
            lines.append(
                f"| {name} | {len(st)} | {sec:.2f} | {100 * sec / total:.1f}% | "
                f"{_median([s['wall'] * 1e3 for s in st]):.2f} | {tok:,} | {tok / sec:,.0f} |"
            )
        lines.append("")
    return lines


def profile_tables(mode: str, kind: str, prof: dict) -> list[str]:
    wall = prof["wall_us"]
    busy = prof["gpu_busy_us"]
    cats = defaultdict(lambda: [0.0, 0])
    names = defaultdict(lambda: [0.0, 0, ""])
    for k in prof["kernels"]:
        cats[k["category"]][0] += k["dur"]
        cats[k["category"]][1] += 1
        n = names[k["name"][:90]]
        n[0] += k["dur"]
        n[1] += 1
        n[2] = k["category"]
    total = sum(v[0] for v in cats.values())
    launches = {k: v for k, v in prof["calls"].items() if k in LAUNCH_CALLS}
    syncs = {k: v for k, v in prof["calls"].items() if k in SYNC_CALLS}
    lines = [
        f"#### {mode}, {kind} step: batch {prof['batch']}, {prof['tokens']} tokens",
        "",
        f"Step {wall / 1e3:.2f} ms under the profiler; GPU busy {busy / 1e3:.2f} ms "
        f"({100 * busy / wall:.0f}% of the step), idle {max(0.0, wall - busy) / 1e3:.2f} ms; "
        f"{len(prof['kernels'])} GPU activities. Launch calls: "
        + (
            ", ".join(f"{k} {v[0]} ({v[1] / 1e3:.2f} ms)" for k, v in sorted(launches.items()))
            or "none"
        )
        + ". Syncs: "
        + (
            ", ".join(f"{k} {v[0]} ({v[1] / 1e3:.2f} ms)" for k, v in sorted(syncs.items()))
            or "none"
        )
        + ".",
    ]
    if "graph_kernels" in prof:
        lines.append(
            f"Graph replay: {prof['graph_kernels']} kernels, "
            f"{prof['graph_kernels_matched']} matched by name and order to an eager forward."
        )
    lines += [
        "",
        "| GPU share | ms | % of GPU time | % of step | kernels |",
        "|---|---:|---:|---:|---:|",
    ]
    for cat, (dur, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"| {cat} | {dur / 1e3:.3f} | {100 * dur / total:.1f}% | {100 * dur / wall:.1f}% | {n} |"
        )
    lines += ["", "| top kernels | share | ms | count |", "|---|---|---:|---:|"]
    for name, (dur, n, cat) in sorted(names.items(), key=lambda kv: -kv[1][0])[:10]:
        lines.append(f"| `{name}` | {cat} | {dur / 1e3:.3f} | {n} |")
    return lines + [""]


def write_report(out: Path, args, results: dict, device_name: str, elapsed: float) -> None:
    import triton

    kept = ""
    if out.exists() and KEEP_MARK in out.read_text():
        kept = out.read_text().split(KEEP_MARK, 1)[1]
    lines = [
        f"# Step breakdown — {args.model} shape on {device_name}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, triton {triton.__version__}. Command: `python "
        f"benchmarks/step_breakdown.py {' '.join(sys.argv[1:])}` ({elapsed:.0f} s). Workload: "
        f"`benchmarks/throughput.py`'s ({args.num_requests} requests, lengths 100..1024, "
        f"greedy, ids only: no detokenization), first {args.steps} steps; "
        f"max_num_batched_tokens {args.max_num_batched_tokens}.",
        "",
        "## Host phases",
        "",
        "Per step (one `LLM.step_tokens()` call), exclusive times (a phase's nested phases "
        "are listed on their own). `GPU wait` is the wait for the sampled ids' copy to the "
        "host (the engine's one sync per step): with asynchronous scheduling "
        f"({'off: --sync' if args.sync else 'on'} in this run) the call launches step N, "
        "then waits for step N-1's ids while N is queued behind it, so the GPU idles only "
        "when the host work of a call exceeds the GPU time of a step. Steady decode: "
        "decode-only steps at >= 90% of the batch; mixed: prompt chunks beside decodes, "
        ">= 50% of the batch (the kind of the step a call launches). `host` mode: model "
        "and sampler stubbed.",
        "",
        *host_table(results, args.num_requests),
        "",
        "## The whole run, by kind of step",
        "",
        *run_table(results),
        "## GPU timelines (torch profiler, one step each)",
        "",
    ]
    for mode, res in results.items():
        for kind in ("decode", "mixed"):
            prof = res.get(f"profile_{kind}")
            if prof:
                lines += profile_tables(mode, kind, prof)
    text = "\n".join(lines) + "\n"
    if kept:
        text += KEEP_MARK + kept
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="qwen3-0.6b", choices=["qwen3-0.6b", "llama3-8b", "tiny"])
    p.add_argument("--device", default=None)
    p.add_argument("--modes", default=None, help=f"subset of {','.join(MODES)} (GPU default: all)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=160, help="engine steps of the eager mode")
    p.add_argument(
        "--steps-full", type=int, default=0,
        help="engine steps of the graphs and host modes (default 0: the whole workload)",
    )  # fmt: skip
    p.add_argument(
        "--light", action="store_true",
        help="phase timers only: no profiler ranges, no profiled steps "
        "(the instrumentation's own cost: compare its whole-run time with throughput.py's)",
    )  # fmt: skip
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=8192,
        help="the engine's token budget per step (8192: the maps so far)",
    )  # fmt: skip
    p.add_argument(
        "--sync", action="store_true",
        help="the synchronous engine loop (async_scheduling=False), as before async scheduling",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json-out", type=Path, default=None, help="also save the raw results")
    p.add_argument("--trace-out", type=Path, default=None, help="save gzipped traces here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        Path(args.result_file).write_text(json.dumps(worker(args)))
        return
    modes = (args.modes or ("graphs,eager,host" if args.device == "cuda" else "eager,host")).split(
        ","
    )
    from hf2paged.bench import preset_config, save_random_model

    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="step-breakdown-") as tmp:
        tmp = Path(tmp)
        dirs = {}
        for mode in modes:
            model = "tiny" if mode == "host" else args.model
            if model not in dirs:
                device = "cpu" if mode == "host" else args.device
                dtype = torch.bfloat16 if device == "cuda" else torch.float32
                dirs[model] = save_random_model(preset_config(model), tmp / model, dtype, device)
            result_file = tmp / f"{mode}.json"
            cmd = [sys.executable, __file__, "--worker", mode, "--model", model,
                   "--model-dir", str(dirs[model]), "--result-file", str(result_file),
                   "--device", args.device, "--num-requests", str(args.num_requests),
                   "--steps", str(args.steps), "--steps-full", str(args.steps_full)]  # fmt: skip
            if args.light:
                cmd.append("--light")
            if args.sync:
                cmd.append("--sync")
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
            if args.trace_out:
                cmd += ["--trace-out", str(args.trace_out)]
            print(f"== {mode}", flush=True)
            t = time.perf_counter()
            path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
            proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=path))
            if proc.returncode != 0:
                print(f"{mode} failed (exit {proc.returncode})", flush=True)
                continue
            results[mode] = json.loads(result_file.read_text())
            print(
                f"{mode}: {len(results[mode]['steps'])} steps in {time.perf_counter() - t:.0f} s",
                flush=True,
            )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results))
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        import platform

        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    slug = re.sub(r"[^a-z0-9]+", "-", name.split(" (")[0].lower()).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"step-breakdown-{slug}.md"
    write_report(out, args, results, name, time.perf_counter() - start)
    print(out.read_text())


if __name__ == "__main__":
    main()
