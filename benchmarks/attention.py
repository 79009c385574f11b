"""Paged attention kernels vs torch SDPA on the same K/V stored contiguously (GPU).

    PYTHONPATH=. python benchmarks/attention.py            # full table
    PYTHONPATH=. python benchmarks/attention.py --quick    # smoke: 3 decode shapes
    PYTHONPATH=. python benchmarks/attention.py --tune     # decode/prefill config sweep

Decode: 32 query / 8 KV heads, head_dim 128, bf16, shuffled block tables. TB/s counts
the K+V bytes each call must read once; "% copy" divides by the device-to-device copy
bandwidth (bytes read + written) measured in the same run. L2 is flushed before every
timed call; times are medians of CUDA-event timings. Writes
`benchmarks/results/attention-<device>.md` and prints it.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.attention.metadata import InputMetadata
from runtime.attention.triton_config import DecodeConfig, PrefillConfig, choose_num_splits
from runtime.attention.triton_ops import paged_attention

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
DECODE_SHAPES = [  # (batch, context, block size)
    (1, 32768, 16), (8, 16384, 16), (32, 8192, 16), (64, 4096, 16), (64, 4096, 32),
    (64, 4096, 64), (128, 2048, 16), (256, 1024, 16), (256, 512, 16), (16, 512, 16),
]  # fmt: skip
QUICK_SHAPES = [(1, 32768, 16), (64, 4096, 16), (256, 512, 16)]
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
_FLUSH = None


def timed(fn, reps: int) -> float:
    """Median microseconds of ``fn()`` over ``reps`` calls, L2 flushed before each."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")  # > any L2
    for _ in range(3):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        _FLUSH.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return 1000.0 * times[len(times) // 2]


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy, TB/s counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / us / 1e6


def paged_copy(k: torch.Tensor, v: torch.Tensor, block_size: int):
    """K/V ``[B, Hkv, L, D]`` into a paged cache with shuffled blocks, and its metadata."""
    batch, _, ctx, _ = k.shape
    per_seq = triton.cdiv(ctx, block_size)
    tables = torch.randperm(batch * per_seq).view(batch, per_seq)  # [B, per_seq]
    cache = torch.zeros(2, batch * per_seq, block_size, HKV, D, dtype=k.dtype, device="cuda")
    padded = per_seq * block_size
    for i, t in enumerate((k, v)):
        t = F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, padded - ctx))  # [B, padded, Hkv, D]
        cache[i, tables.flatten().cuda()] = t.reshape(batch * per_seq, block_size, HKV, D)
    return cache, tables.tolist()


def sdpa_best(q, k, v, reps: int, **kw) -> tuple[float, str, torch.Tensor]:
    """Fastest SDPA backend that accepts these inputs (GQA through enable_gqa)."""
    best = None
    for name, backend in SDPA_BACKENDS.items():
        call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # noqa: E731
        try:
            with sdpa_kernel(backend):
                out = call()
                us = timed(call, reps)
        except RuntimeError:
            continue
        if best is None or us < best[0]:
            best = (us, name, out)
    assert best is not None, "no SDPA backend ran"
    return best


def sdpa_flash_lower_right(q, k, v, reps: int) -> tuple[float, str, torch.Tensor]:
    """Flash attention with the causal mask aligned to the last key (a chunk after cached
    context): aten's flash op means exactly that by ``is_causal`` when Q < L."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    try:
        call = lambda: flash(q, k, v, 0.0, is_causal=True, scale=D**-0.5)[0]  # noqa: E731
        out = call()
        name = "flash"
    except RuntimeError:  # no native GQA in this build: give it the repeated heads
        kk, vv = (t.repeat_interleave(HQ // HKV, 1) for t in (k, v))
        call = lambda: flash(q, kk, vv, 0.0, is_causal=True, scale=D**-0.5)[0]  # noqa: E731
        out = call()
        name = "flash, K/V heads repeated"
    return timed(call, reps), name, out


def decode_case(batch: int, ctx: int, block_size: int, reps: int, configs: list[DecodeConfig]):
    q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device="cuda")  # [B, Hq, 1, D]
    k = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device="cuda")  # [B, Hkv, L, D]
    v = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device="cuda")  # [B, Hkv, L, D]
    sdpa_us, backend, ref = sdpa_best(q, k, v, reps)
    cache, tables = paged_copy(k, v, block_size)
    md = InputMetadata.build(tables, [ctx - 1] * batch, [1] * batch, block_size, device="cuda")
    query = q.view(batch, HQ, D)  # [T=B, Hq, D]
    results = []
    for cfg in configs:
        call = lambda c=cfg: paged_attention(query, cache, md, scale=D**-0.5, decode_config=c)  # noqa: E731
        err = (call().float() - ref.view(batch, HQ, D).float()).abs().max().item()
        results.append((timed(call, reps), cfg, err))
    kv_bytes = 2 * k.numel() * k.element_size()
    return sdpa_us, backend, kv_bytes, results


def prefill_case(ctx: int, new: int, reps: int, configs: list[PrefillConfig]):
    """One sequence: ``new`` query tokens after ``ctx`` cached ones (ctx 0 = fresh prompt)."""
    total = ctx + new
    q = torch.randn(1, HQ, new, D, dtype=DTYPE, device="cuda")  # [1, Hq, Q, D]
    k = torch.randn(1, HKV, total, D, dtype=DTYPE, device="cuda")  # [1, Hkv, L, D]
    v = torch.randn(1, HKV, total, D, dtype=DTYPE, device="cuda")  # [1, Hkv, L, D]
    if ctx == 0:
        sdpa_us, backend, ref = sdpa_best(q, k, v, reps, is_causal=True)
    else:
        sdpa_us, backend, ref = sdpa_flash_lower_right(q, k, v, reps)
    cache, tables = paged_copy(k, v, 16)
    md = InputMetadata.build(tables, [ctx], [new], 16, device="cuda")
    query = q[0].transpose(0, 1).contiguous()  # [Q, Hq, D]
    expected = ref[0].transpose(0, 1).float()  # [Q, Hq, D]
    results = []
    for cfg in configs:
        call = lambda c=cfg: paged_attention(query, cache, md, scale=D**-0.5, prefill_config=c)  # noqa: E731
        err = (call().float() - expected).abs().max().item()
        results.append((timed(call, reps), cfg, err))
    flops = 4 * HQ * D * (new * ctx + new * (new + 1) // 2)  # QK^T and PV over visible pairs
    return sdpa_us, backend, flops, results


def decode_sweep() -> list[DecodeConfig]:
    tiles = [
        DecodeConfig(block_n=n, num_warps=w, num_stages=s)
        for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
    ]
    return tiles + [DecodeConfig(programs_per_sm=p) for p in (0.5, 1.0, 4.0)]


def prefill_sweep() -> list[PrefillConfig]:
    return [
        PrefillConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
        if not (m == 128 and w == 4)
    ]


def describe(cfg) -> str:
    return ", ".join(f"{k}={v}" for k, v in vars(cfg).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 decode shapes, fewer reps")
    parser.add_argument("--tune", action="store_true", help="sweep decode and prefill configs")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="markdown path")
    args = parser.parse_args()
    reps = 30 if args.quick else max(30, args.reps)
    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out_path = args.out or Path(__file__).parent / "results" / f"attention-{slug}.md"
    bw = copy_bandwidth(reps)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [
        f"# Paged attention vs torch SDPA — {device}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, {sms} SMs; copy bandwidth "
        f"{bw:.3f} TB/s (read + write); {HQ} q / {HKV} kv heads, head_dim {D}, bf16; "
        f"L2 flushed, median of {reps} reps. SDPA runs on the same K/V stored contiguously "
        "([B, Hkv, L, D]) with its fastest backend (enable_gqa).",
        "",
        "## Decode",
        "",
        "| batch × context | block | splits | paged µs | SDPA µs (backend) | paged TB/s | "
        "SDPA TB/s | SDPA time / paged time | paged % of copy | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tune_lines = ["", "## Tuning sweep", ""]
    shapes = QUICK_SHAPES if args.quick else DECODE_SHAPES
    for batch, ctx, block_size in shapes:
        configs = decode_sweep() if args.tune and block_size == 16 else [DecodeConfig()]
        sdpa_us, backend, kv_bytes, results = decode_case(batch, ctx, block_size, reps, configs)
        us, cfg, err = results[0]  # the default config is what the runtime uses
        splits = choose_num_splits(batch, HKV, torch.device("cuda"), cfg)
        lines.append(
            f"| {batch} × {ctx} | {block_size} | {splits} | {us:.1f} | {sdpa_us:.1f} ({backend}) | "
            f"{kv_bytes / us / 1e6:.3f} | {kv_bytes / sdpa_us / 1e6:.3f} | {sdpa_us / us:.3f} | "
            f"{100 * kv_bytes / us / 1e6 / bw:.1f}% | {err:.1e} |"
        )
        print(lines[-1], flush=True)
        if args.tune:
            tune_lines.append(f"decode {batch} × {ctx} (SDPA {sdpa_us:.1f} µs):")
            for t_us, t_cfg, _ in sorted(results, key=lambda r: r[0])[:6]:
                tune_lines.append(f"- {t_us:.1f} µs ({sdpa_us / t_us:.3f}x): {describe(t_cfg)}")
    lines += [
        "",
        "## Prefill (one sequence)",
        "",
        "| case | paged µs | SDPA µs (backend) | paged TFLOP/s | SDPA TFLOP/s | "
        "paged time / SDPA time | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ctx, new in (
        ("4096 fresh tokens", 0, 4096),
        ("1024-token chunk after 3072 cached", 3072, 1024),
    ):
        configs = [PrefillConfig()] + (prefill_sweep() if args.tune else [])
        sdpa_us, backend, flops, results = prefill_case(ctx, new, reps, configs)
        us, _, err = results[0]
        lines.append(
            f"| {name} | {us:.1f} | {sdpa_us:.1f} ({backend}) | {flops / us / 1e6:.0f} | "
            f"{flops / sdpa_us / 1e6:.0f} | {us / sdpa_us:.3f} | {err:.1e} |"
        )
        print(lines[-1], flush=True)
        if args.tune:
            tune_lines.append(f"prefill {name} (SDPA {sdpa_us:.1f} µs):")
            for t_us, t_cfg, _ in sorted(results, key=lambda r: r[0])[:6]:
                tune_lines.append(
                    f"- {t_us:.1f} µs ({t_us / sdpa_us:.3f}x SDPA): {describe(t_cfg)}"
                )
    text = "\n".join(lines + (tune_lines if args.tune else [])) + "\n"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
