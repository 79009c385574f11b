"""The throughput benchmark's HBM roofline and its markdown report."""

from __future__ import annotations

import datetime
import platform
import re
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hf2paged.bench import Request, RunResult, percentile


@dataclass
class Roofline:
    """Fastest the workload can run when decoding is bound by memory bandwidth.

    Every decode step reads the weights once (all requests decoding together, so
    `max(output length)` steps) and each new token reads its request's whole KV so far;
    every token's K/V is written once. Compute, prefill attention and the embedding
    lookups are left out, so this is an upper bound on tokens/s. With TP the bytes split
    over the ranks, which read in parallel.
    """

    weight_bytes: int  # read per step (input embedding left out unless tied to the LM head)
    kv_bytes_per_token: int
    steps: int
    kv_read_bytes: float
    kv_write_bytes: float
    bandwidth: float  # bytes/s, measured copy (read + write)
    tp: int
    output_tokens: int

    @classmethod
    def of(
        cls, model_dir: Path, config, workload: list[Request], dtype, bandwidth: float, tp: int
    ) -> Roofline:
        from safetensors import safe_open

        itemsize = torch.empty((), dtype=dtype).element_size()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        weight_bytes = 0
        for shard in sorted(model_dir.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for key in f.keys():
                    if key.endswith("embed_tokens.weight") and not tied:
                        continue  # a lookup reads a few rows, not the table
                    weight_bytes += _numel(f.get_slice(key).get_shape()) * itemsize
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        kv_per_token = config.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
        reads = sum(
            r.max_tokens * len(r.prompt_token_ids) + r.max_tokens * (r.max_tokens - 1) / 2
            for r in workload
        )
        writes = sum(len(r.prompt_token_ids) + r.max_tokens for r in workload)
        return cls(
            weight_bytes=weight_bytes,
            kv_bytes_per_token=kv_per_token,
            steps=max(r.max_tokens for r in workload),
            kv_read_bytes=reads * kv_per_token,
            kv_write_bytes=writes * kv_per_token,
            bandwidth=bandwidth,
            tp=tp,
            output_tokens=sum(r.max_tokens for r in workload),
        )

    @property
    def seconds(self) -> float:
        total = self.steps * self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes
        return total / (self.bandwidth * self.tp)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds


def _tp_of(name: str) -> int:
    """GPU count of a result row: ours is named "hf2paged (ours, tp=N)"; HF runs on one."""
    match = re.search(r"tp=(\d+)", name)
    return int(match.group(1)) if match else 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1e3:,.1f}"


def _spread(results: dict) -> list[str]:
    """A section on the setups measured more than once (`--repeat`): each run's output
    tok/s, the median and the spread (max - min) as a fraction of the median."""
    runs: dict[str, list[float]] = {}
    for r in results.values():
        if isinstance(r, RunResult):
            runs.setdefault(re.sub(r", run \d+/\d+\)$", ")", r.name), []).append(r.output_tps)
    repeated = {name: tps for name, tps in runs.items() if len(tps) > 1}
    if not repeated:
        return []
    lines = ["", "## Spread over repeated runs", ""]
    for name, tps in repeated.items():
        median = statistics.median(tps)
        lines.append(
            f"- {name}: {len(tps)} runs, output tok/s {' / '.join(f'{t:,.0f}' for t in tps)}; "
            f"median {median:,.0f}, spread {(max(tps) - min(tps)) / median:.1%} of it"
        )
    return lines


def write_report(
    out: Path, args, slug, config, workload, roofline: Roofline, results: dict
) -> None:
    """(Re)write the markdown report with every result so far."""
    import transformers

    cb = results.get("hf-cb")
    cb_tps = cb.output_tps if isinstance(cb, RunResult) else None
    lines = [
        f"# Throughput: {args.model} shape on {slug}"
        + (f" (first {args.num_layers} layers)" if getattr(args, "num_layers", None) else ""),
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}.",
        f"Command: `python benchmarks/throughput.py {' '.join(sys.argv[1:])}`",
        "",
        f"Workload: {len(workload)} requests, random token ids, input and output lengths uniform in "
        f"{args.min_len}..{args.max_len} (seed {args.seed}): {sum(len(r.prompt_token_ids) for r in workload):,} "
        f"input and {roofline.output_tokens:,} output tokens; greedy, every request generates exactly its "
        f"output length. Model: {config.model_type} with random weights in {args.dtype} "
        f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads}/{getattr(config, 'num_key_value_heads', None)} q/kv heads, "
        f"vocab {config.vocab_size}). Each system runs in its own process on the same saved weights.",
        "",
        "| system | output tok/s | total tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | peak GPU mem (GiB) | vs HF CB | of roofline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for system, r in results.items():
        if not isinstance(r, RunResult):
            lines.append(f"| {system} | {r} | | | | | | |")
            continue
        mem = f"{r.peak_memory_bytes / 2**30:.1f}" if r.peak_memory_bytes else "-"
        ratio = f"{r.output_tps / cb_tps:.2f}x" if cb_tps else "-"
        bound = replace(roofline, tp=_tp_of(r.name))  # a TP run's bytes split over its GPUs
        lines.append(
            f"| {r.name} | {r.output_tps:,.0f} | {r.total_tps:,.0f} | {_ms(r.ttft_s, 50)} / {_ms(r.ttft_s, 99)} "
            f"| {_ms(r.itl_s, 50)} / {_ms(r.itl_s, 99)} | {mem} | {ratio} | {r.output_tps / bound.output_tps:.1%} |"
        )
        notes += [f"- {r.name}: {n}" for n in r.notes]
    lines += [
        "",
        "TTFT counts from the moment all requests are submitted (offline batch: later requests wait). "
        "ITL is every gap between two consecutive tokens of one request. Peak memory is torch's "
        "`max_memory_allocated`, which includes the KV cache each engine reserves up front.",
        "",
        "## HBM roofline",
        "",
        f"Measured device copy bandwidth {roofline.bandwidth / 1e9:,.0f} GB/s (read + write). "
        f"Per decode step the weights are read once ({roofline.weight_bytes / 1e9:.2f} GB) over "
        f"{roofline.steps} steps (all requests decoding together), plus every KV read "
        f"({roofline.kv_read_bytes / 1e12:.2f} TB at {roofline.kv_bytes_per_token / 1024:.0f} KiB/token) and "
        f"write ({roofline.kv_write_bytes / 1e9:.1f} GB), on one GPU: at least "
        f"{roofline.seconds:.2f} s, i.e. at most **{roofline.output_tps:,.0f} output tok/s**"
        + "".join(
            f"; over TP={t} GPUs {replace(roofline, tp=t).output_tps:,.0f}"
            for t in sorted({_tp_of(r.name) for r in results.values() if isinstance(r, RunResult)})
            if t > 1
        )
        + ". Compute and prefill are ignored, so this bound is optimistic; each row's "
        "fraction uses the bound of its own GPU count.",
    ]
    lines += _spread(results)
    tps = sorted({_tp_of(r.name) for r in results.values() if isinstance(r, RunResult)})
    if max(tps, default=1) > 1:
        notes.append(
            "- ours runs with tensor parallelism where its row says tp > 1 (one process per "
            "GPU, NCCL); the HF baselines run on one GPU."
        )
    if notes:
        lines += ["", "## Notes", "", *notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
