"""The fused-MoE layer against transformers' own experts implementations (GPU; CPU smoke).

    PYTHONPATH=. python benchmarks/moe.py            # Qwen3-30B-A3B shapes, 1..8192 tokens
    PYTHONPATH=. python benchmarks/moe.py --tokens 1,64,4096 --reps 50
    PYTHONPATH=. python benchmarks/moe.py --smoke    # CPU: tiny shapes, Triton interpreter

Shapes of Qwen3-30B-A3B's routed experts: 128 experts, top-8, hidden 2048, expert
intermediate 768, bf16 (one layer). Routing: top-8 of a softmax over random logits per
token, the same for every system. Systems, all on the same weights and routing:

- ``ours``: `runtime.moe.FusedMoE` on its Triton path, eager and replayed from a CUDA graph;
- ``hf grouped_mm`` / ``hf batched_mm``: transformers' `Qwen3MoeExperts` with
  ``config._experts_implementation`` set to each (transformers/integrations/moe.py);
  batched_mm gathers one weight matrix per (token, expert) pair and is skipped where that
  copy would not fit in memory;
- ``hf eager``: the same class's own forward, a per-expert torch loop.

Reported per token count: microseconds (median of interleaved rounds of CUDA-event
timings, L2 flushed before each call), TFLOP/s (6 * pairs * H * I), the expert weights
actually touched (distinct routed experts * 3 * H * I * 2 bytes) as TB/s and as % of the
device-to-device copy bandwidth, and TFLOP/s as % of the bf16 matmul peak (an 8192^3
bf16 matmul), both ceilings measured in the same run. Writes
`benchmarks/results/moe-<device>.md` and prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if "--smoke" in sys.argv:  # before triton is imported: the interpreter runs the kernels on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["HF2PAGED_MOE_BACKEND"] = "triton"  # CPU would pick the torch reference

import torch  # noqa: E402
import triton  # noqa: E402
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from benchmarks.throughput import copy_bandwidth, device_slug  # noqa: E402
from runtime.moe import FusedMoE  # noqa: E402

FULL = dict(num_experts=128, top_k=8, hidden=2048, inter=768)
SMOKE = dict(num_experts=8, top_k=2, hidden=64, inter=32)
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
SMOKE_TOKENS = [1, 4, 16]
HF_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


class Timer:
    """Median microseconds of a call: CUDA events with an L2 flush before each call on a
    GPU, wall-clock on CPU."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.flush = (
            torch.empty(512 << 20, dtype=torch.uint8, device=device)
            if device.type == "cuda"
            else None
        )

    def __call__(self, fn: Callable) -> float:
        for _ in range(2):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return 1e6 * statistics.median(times)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.reps)
        ]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in events)

    def interleaved(self, calls: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
        """Every call timed in each of ``rounds`` alternating rounds (drifts hit all alike)."""
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                times[name].append(self(fn))
        return times


def matmul_peak(device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (the compute ceiling)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    us = min(timer(lambda: a @ b) for _ in range(3))
    return 2 * n**3 / us * 1e6


def capture(fn: Callable) -> Callable | None:
    """A CUDA-graph replay of ``fn`` (None where it cannot be captured), checked against an
    eager call."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    if not torch.equal(out, fn()):
        raise AssertionError("CUDA-graph replay differs from the eager call")
    return graph.replay


def build(shape: dict, dtype: torch.dtype, device: torch.device):
    """(ours, {implementation: transformers experts}) on the same random weights."""
    config = Qwen3MoeConfig(
        hidden_size=shape["hidden"],
        moe_intermediate_size=shape["inter"],
        num_experts=shape["num_experts"],
        num_experts_per_tok=shape["top_k"],
        hidden_act="silu",
    )
    torch.manual_seed(0)
    hf = Qwen3MoeExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.gate_up_proj.normal_(0, shape["hidden"] ** -0.5)
        hf.down_proj.normal_(0, shape["inter"] ** -0.5)
    ours = FusedMoE(
        shape["num_experts"], shape["hidden"], shape["inter"], activation="silu",
        params_dtype=dtype,
    ).to(device)  # fmt: skip
    for name, param in ours.named_parameters():
        param.weight_loader(param, getattr(hf, name).detach())
    systems = {}
    for impl in HF_IMPLEMENTATIONS:
        view = Qwen3MoeExperts.__new__(Qwen3MoeExperts)  # same parameters, own dispatch
        view.__dict__.update(hf.__dict__)
        view.config = Qwen3MoeConfig(**config.to_dict())
        view.config._experts_implementation = impl
        systems[f"hf {impl}"] = view
    return ours, systems


def routing(num_tokens: int, shape: dict, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(num_tokens)
    logits = torch.randn(num_tokens, shape["num_experts"], generator=g)
    weights, index = logits.softmax(-1).topk(shape["top_k"], dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    x = torch.randn(num_tokens, shape["hidden"], generator=g)
    return x.to(device, dtype), index.to(device), weights.to(device, dtype)


def batched_mm_fits(num_pairs: int, shape: dict, dtype: torch.dtype, device) -> bool:
    need = num_pairs * 3 * shape["hidden"] * shape["inter"] * dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 << 30
    return need < 0.5 * free


@torch.inference_mode()
def run(args: argparse.Namespace) -> str:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    shape = SMOKE if args.smoke else FULL
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    timer = Timer(device, args.reps)
    copy_bw = copy_bandwidth(str(device))  # bytes/s, read + write
    peak = matmul_peak(device, dtype, timer)  # FLOP/s
    ours, hf = build(shape, dtype, device)
    E, k, H, I = shape["num_experts"], shape["top_k"], shape["hidden"], shape["inter"]  # noqa: E741
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    lines = [
        f"# Fused MoE vs transformers' experts implementations — {name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; {E} experts, top-{k}, hidden "
        f"{H}, expert intermediate {I}, bf16 (Qwen3-30B-A3B's routed experts, one layer). "
        f"Ceilings measured in this run: copy bandwidth {copy_bw / 1e12:.3g} TB/s (read + "
        f"write), bf16 matmul peak {peak / 1e12:.3g} TFLOP/s. Median of {args.rounds} "
        f"interleaved rounds of the median of {args.reps} timings"
        + (", L2 flushed before each call" if device.type == "cuda" else "")
        + ". Weight TB/s counts each routed expert's weights once (distinct experts hit x "
        f"3 x H x I x 2 bytes). Generated by `benchmarks/moe.py{' --smoke' if args.smoke else ''}`.",
        "",
        "| tokens | experts hit | system | µs | spread | TFLOP/s | weight TB/s | % of copy bw "
        "| % of matmul peak | time / ours | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for num_tokens in tokens:
        x, index, weights = routing(num_tokens, shape, device, dtype)
        pairs = num_tokens * k
        hit = int(torch.unique(index).numel())
        flops = 6 * pairs * H * I
        weight_bytes = hit * 3 * H * I * dtype.itemsize
        inputs = (x, index, weights)
        calls = {"ours": lambda inputs=inputs: ours(*inputs)}
        if device.type == "cuda":
            graph = capture(calls["ours"])
            if graph is not None:
                calls["ours, CUDA graph"] = graph
        for system, module in hf.items():
            if system == "hf batched_mm" and not batched_mm_fits(pairs, shape, dtype, device):
                continue
            if system == "hf eager" and num_tokens > args.eager_max_tokens:
                continue
            calls[system] = lambda module=module, inputs=inputs: module(*inputs)
        reference = hf["hf grouped_mm"](x, index, weights).float()
        outputs = {n: (c() if not n.endswith("graph") else None) for n, c in calls.items()}
        times = timer.interleaved(calls, args.rounds)
        base = statistics.median(times["ours"])
        for system, ts in times.items():
            us = statistics.median(ts)
            out = outputs[system] if outputs[system] is not None else outputs["ours"]
            err = (out.float() - reference).abs().max().item()
            spread = (max(ts) - min(ts)) / us if len(ts) > 1 else 0.0
            lines.append(
                f"| {num_tokens} | {hit} | {system} | {us:.1f} | ±{100 * spread / 2:.1f}% | "
                f"{flops / us / 1e6:.3g} | {weight_bytes / us / 1e6:.3g} | "
                f"{100 * weight_bytes / us * 1e6 / copy_bw:.1f}% | "
                f"{100 * flops / us * 1e6 / peak:.1f}% | {us / base:.2f} | {err:.1e} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "Notes: `spread` is half the range of the interleaved rounds' medians, relative. "
        "`% of copy bw` compares a read-only stream of the expert weights with a copy that "
        "counts its read and its write, so it can pass 100%. The decode-size target "
        "(<= 256 tokens) is >= 70% of copy bandwidth; the prefill target (>= 4096 tokens) "
        ">= 50% of the matmul peak. `hf batched_mm` is left out where its per-pair weight "
        f"copy would not fit in half the free memory; `hf eager` above {args.eager_max_tokens} "
        "tokens (minutes per call).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager-max-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None, help="markdown path")
    args = parser.parse_args()
    if args.reps is None:
        args.reps = 3 if args.smoke else 30
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke for the CPU smoke run)")
    text = run(args)
    device = "cpu" if args.smoke else "cuda"
    out = args.out or REPO / "benchmarks" / "results" / (
        f"moe-{device_slug(device)}{'-smoke' if args.smoke else ''}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
