"""Paged attention kernels vs torch SDPA on the same K/V stored contiguously (GPU).

    PYTHONPATH=. python benchmarks/attention.py            # full table
    PYTHONPATH=. python benchmarks/attention.py --quick    # smoke: 3 decode shapes
    PYTHONPATH=. python benchmarks/attention_tune.py       # launch-config sweep

32 query / 8 KV heads, head_dim 128, bf16, block tables shuffled. Decode TB/s counts the
K+V bytes a call must read once; "% of copy" divides by the device-to-device copy
bandwidth (bytes read + written) measured in the same run. L2 is flushed before every
timed call; each number is the median over 3 interleaved rounds (ours and SDPA
alternate) of the median of ``--reps`` CUDA-event timings; decode is also timed as a
CUDA-graph replay (no Python launch overhead; checks that it is capturable). Writes
`benchmarks/results/attention-<device>.md` and prints it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.attention.params import AttentionParams
from runtime.attention.triton_config import (
    DecodeConfig,
    choose_num_splits,
    decode_config,
    kernel_target,
)
from runtime.attention.triton_ops import paged_attention
from runtime.engine.step_inputs import StepInputs

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
SCALE = D**-0.5
PARAMS = AttentionParams(SCALE)
DECODE_SHAPES = [  # (batch, context, block size)
    (1, 32768, 16), (8, 16384, 16), (32, 8192, 16), (64, 4096, 16), (64, 4096, 32),
    (64, 4096, 64), (128, 2048, 16), (256, 1024, 16), (256, 512, 16), (16, 512, 16),
]  # fmt: skip
QUICK_SHAPES = [(1, 32768, 16), (64, 4096, 16), (256, 512, 16)]
PREFILL_CASES = [("4096 fresh tokens", 0, 4096), ("1024-token chunk after 3072 cached", 3072, 1024)]
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
_FLUSH: list[torch.Tensor] = []


def timed(fn: Callable, reps: int) -> float:
    """Median microseconds of ``fn()`` over ``reps`` calls, L2 flushed before each."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(512 << 20, dtype=torch.uint8, device="cuda"))  # > any L2
    for _ in range(3):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        _FLUSH[0].zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in events)


def interleaved(calls: dict[str, Callable], reps: int, rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` alternating rounds: slow drifts (clocks, power) hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(timed(fn, reps))
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy, TB/s counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / us / 1e6


def paged_copy(k: torch.Tensor, v: torch.Tensor, block_size: int, shuffle: bool = True):
    """K/V ``[B, Hkv, L, D]`` copied into a paged cache; returns (cache, block tables)."""
    batch, _, ctx, _ = k.shape
    per_seq = triton.cdiv(ctx, block_size)
    order = torch.randperm(batch * per_seq) if shuffle else torch.arange(batch * per_seq)
    tables = order.view(batch, per_seq)  # [B, per_seq]
    cache = torch.zeros(2, batch * per_seq, block_size, HKV, D, dtype=k.dtype, device="cuda")
    for i, t in enumerate((k, v)):
        t = F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, per_seq * block_size - ctx))  # [B, L', Hkv, D]
        cache[i, tables.flatten().cuda()] = t.reshape(batch * per_seq, block_size, HKV, D)
    return cache, tables.tolist()


def sdpa_calls(q, k, v, **kw) -> dict[str, Callable]:
    """Every SDPA backend that accepts these inputs (GQA through ``enable_gqa``)."""
    calls = {}
    for name, backend in SDPA_BACKENDS.items():

        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=SCALE, **kw)

        try:
            call()
        except RuntimeError:
            continue
        calls[name] = call
    return calls


def flash_call(q, k, v) -> tuple[str, Callable]:
    """aten's flash-attention op; its ``is_causal`` aligns the mask to the last key, which
    is the chunked-prefill mask when Q < L (SDPA's own ``is_causal`` aligns to the first)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    try:
        flash(q, k, v, 0.0, is_causal=True, scale=SCALE)
        return "flash", lambda: flash(q, k, v, 0.0, is_causal=True, scale=SCALE)[0]
    except RuntimeError:  # no native GQA in this build: hand it the repeated heads
        kk, vv = (t.repeat_interleave(HQ // HKV, 1) for t in (k, v))
        return "flash (K/V heads repeated)", lambda: flash(
            q, kk, vv, 0.0, is_causal=True, scale=SCALE
        )[0]


def decode_setup(batch: int, ctx: int, block_size: int, shuffle: bool = True):
    """(SDPA calls, paged call taking a DecodeConfig, expected [B, Hq, D], K+V bytes)."""
    q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device="cuda")  # [B, Hq, 1, D]
    k = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device="cuda")  # [B, Hkv, L, D]
    v = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device="cuda")  # [B, Hkv, L, D]
    sdpa = sdpa_calls(q, k, v)
    expected = next(iter(sdpa.values()))().view(batch, HQ, D).float()
    cache, tables = paged_copy(k, v, block_size, shuffle)
    md = (
        StepInputs.build(tables, [ctx - 1] * batch, [1] * batch, block_size)
        .to_device("cuda")
        .metadata
    )
    query = q.view(batch, HQ, D)  # [T=B, Hq, D]

    def paged(cfg: DecodeConfig | None = None):
        return paged_attention(query, cache, md, PARAMS, decode_config=cfg)

    return sdpa, paged, expected, 2 * k.numel() * k.element_size()


def prefill_setup(ctx: int, new: int):
    """(SDPA calls, paged call taking a PrefillConfig (and an `sdpa_min_tokens`
    override), expected [Q, Hq, D], FLOPs)."""
    total = ctx + new
    q = torch.randn(1, HQ, new, D, dtype=DTYPE, device="cuda")  # [1, Hq, Q, D]
    k = torch.randn(1, HKV, total, D, dtype=DTYPE, device="cuda")  # [1, Hkv, L, D]
    v = torch.randn(1, HKV, total, D, dtype=DTYPE, device="cuda")  # [1, Hkv, L, D]
    name, flash = flash_call(q, k, v)
    sdpa = {name: flash}
    if ctx == 0:  # SDPA's is_causal is the right mask only without cached context
        sdpa.update({n: c for n, c in sdpa_calls(q, k, v, is_causal=True).items() if n != "flash"})
    expected = flash()[0].transpose(0, 1).float()  # [Q, Hq, D]
    cache, tables = paged_copy(k, v, 16)
    md = StepInputs.build(tables, [ctx], [new], 16).to_device("cuda").metadata
    query = q[0].transpose(0, 1).contiguous()  # [Q, Hq, D]

    def paged(cfg=None, sdpa_min_tokens=None):
        return paged_attention(
            query, cache, md, PARAMS, prefill_config=cfg, sdpa_min_tokens=sdpa_min_tokens
        )

    flops = 4 * HQ * D * (new * ctx + new * (new + 1) // 2)  # QK^T and PV over visible pairs
    return sdpa, paged, expected, flops


def max_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return (out.float() - expected).abs().max().item()


def capture(fn: Callable, exact: bool = True) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph (the decode path promises to be capturable);
    checks that a replay reproduces an eager call: bit for bit, or for SDPA (whose
    backends may pick another algorithm in a capture) to bf16 rounding."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    eager = fn()
    if exact:
        assert torch.equal(out, eager), "CUDA-graph replay differs from the eager call"
    else:
        torch.testing.assert_close(out, eager, atol=1e-2, rtol=1e-2)
    return graph


def decode_table(shapes, reps: int, bw: float) -> list[str]:
    lines = [
        "",
        "## Decode (default launch config)",
        "",
        "Both sides are timed eagerly (a Python call per timing, its launch overhead "
        "included where it outlasts the L2 flush) and as CUDA-graph replays (the kernels "
        "alone: how the engine decodes). SDPA's backend is the fastest eager one; its "
        "graph column replays that backend.",
        "",
        "| batch × context | block | splits | paged µs | SDPA µs (backend) | paged speed / SDPA "
        "| paged µs, graph | SDPA µs, graph | speed / SDPA, graph | paged TB/s, graph "
        "| paged % of copy, graph | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, ctx, block_size in shapes:
        sdpa, paged, expected, kv_bytes = decode_setup(batch, ctx, block_size)
        graph = capture(paged)
        times = interleaved({"paged": paged, "graph": graph.replay, **sdpa}, reps)
        backend = min(sdpa, key=times.get)
        sdpa_graph = capture(sdpa[backend], exact=False)
        graphs = interleaved({"graph": graph.replay, "sdpa": sdpa_graph.replay}, reps)
        us, sdpa_us = times["paged"], times[backend]
        g_us, g_sdpa = graphs["graph"], graphs["sdpa"]
        cuda = torch.device("cuda")
        cfg = decode_config(D, D, DTYPE, HQ // HKV, kernel_target(cuda))
        splits = choose_num_splits(batch, HKV, cuda, cfg)
        lines.append(
            f"| {batch} × {ctx} | {block_size} | {splits} | {us:.1f} | {sdpa_us:.1f} ({backend}) "
            f"| {sdpa_us / us:.3f} | {g_us:.1f} | {g_sdpa:.1f} | {g_sdpa / g_us:.3f} | "
            f"{kv_bytes / g_us / 1e6:.3f} | {100 * kv_bytes / g_us / 1e6 / bw:.1f}% | "
            f"{max_err(paged(), expected):.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def prefill_table(reps: int) -> list[str]:
    lines = [
        "",
        "## Prefill (one sequence, block size 16, default launch config)",
        "",
        "| case | paged µs | paged µs, Triton kernel only | SDPA µs by backend | paged TFLOP/s "
        "| paged time / flash | paged time / fastest SDPA | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ctx, new in PREFILL_CASES:
        sdpa, paged, expected, flops = prefill_setup(ctx, new)
        # "paged": what PagedAttention does (a fresh prompt goes to cuDNN, sdpa_prefill.py)
        kernel = lambda paged=paged: paged(sdpa_min_tokens=1 << 30)  # noqa: E731
        times = interleaved({"paged": paged, "kernel": kernel, **sdpa}, reps)
        us, kernel_us = times.pop("paged"), times.pop("kernel")
        flash = next(t for n, t in times.items() if n.startswith("flash"))
        listed = ", ".join(f"{n} {t:.1f} ({flops / t / 1e6:.0f} TFLOP/s)" for n, t in times.items())
        err = max(max_err(paged(), expected), max_err(kernel(), expected))
        lines.append(
            f"| {name} | {us:.1f} | {kernel_us:.1f} | {listed} | {flops / us / 1e6:.0f} | "
            f"{us / flash:.3f} | {us / min(times.values()):.3f} | {err:.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


NOTES = [
    "",
    "Notes: the copy bandwidth counts bytes read plus bytes written, and a read-only stream "
    "runs a little faster, so decode can pass 100% of it. Eager times include Python launch "
    "overhead wherever it outlasts the L2 flush (about 120 µs of GPU work) queued before "
    "each call; the graph columns time the kernels alone.",
]


def header(
    reps: int, rounds: str = "median of 3 interleaved rounds of", script: str = "attention.py"
) -> tuple[list[str], float]:
    bw = copy_bandwidth(reps)
    props = torch.cuda.get_device_properties(0)
    return [
        f"# Paged attention vs torch SDPA — {props.name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, {props.multi_processor_count} "
        f"SMs; copy bandwidth {bw:.3f} TB/s (read + write); {HQ} q / {HKV} kv heads, head_dim "
        f"{D}, bf16; block tables shuffled; L2 flushed before each call; {rounds} "
        f"{reps} reps. SDPA reads the same K/V stored contiguously "
        f"([B, Hkv, L, D], GQA through enable_gqa). Generated by `benchmarks/{script}`.",
    ], bw


def result_path(suffix: str = "") -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return Path(__file__).parent / "results" / f"attention-{slug}{suffix}.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 decode shapes, no prefill")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="markdown path")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explaining its refusals
    reps = max(30, args.reps)
    lines, bw = header(reps)
    print(lines[-1], flush=True)
    lines += decode_table(QUICK_SHAPES if args.quick else DECODE_SHAPES, reps, bw)
    if not args.quick:
        lines += prefill_table(reps)
    lines += NOTES
    text = "\n".join(lines) + "\n"
    out_path = args.out or result_path("-quick" if args.quick else "")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
