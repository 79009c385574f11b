"""Throughput benchmark pieces shared by `hf2paged bench` and `benchmarks/throughput.py`.

The workload is nano-vllm's: N requests of random token ids, input and output lengths
uniform in [min_len, max_len], every request generating exactly its output length
(`ignore_eos`). Models have random weights built from a config of a real shape, saved
as safetensors so every engine loads them through its ordinary path.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# nano-vllm draws prompt token ids below 10000; any id works for random weights.
PROMPT_ID_LIMIT = 10_000
CPU_KV_CACHE_BYTES = 1 << 30


def preset_config(name: str):
    """The transformers config of a named model shape (no hub access needed)."""
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    if name == "qwen3-0.6b":  # Qwen/Qwen3-0.6B config.json
        return Qwen3Config(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            bos_token_id=151643, eos_token_id=151645, architectures=["Qwen3ForCausalLM"],
        )  # fmt: skip
    if name == "llama3-8b":  # meta-llama/Meta-Llama-3-8B config.json
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
            bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"],
        )  # fmt: skip
    if name == "qwen3-30b-a3b":  # Qwen/Qwen3-30B-A3B config.json (128 experts, top-8)
        return Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            bos_token_id=151643, eos_token_id=151645, architectures=["Qwen3MoeForCausalLM"],
        )  # fmt: skip
    if name == "tiny":  # CPU smoke runs and tests
        return LlamaConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
        )  # fmt: skip
    if name == "tiny-moe":  # CPU smoke runs of mixture-of-experts paths (8 experts, top-2)
        return Qwen3MoeConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, architectures=["Qwen3MoeForCausalLM"],
        )  # fmt: skip
    raise ValueError(
        f"unknown model shape {name!r}; expected qwen3-0.6b, llama3-8b, qwen3-30b-a3b, tiny "
        "or tiny-moe"
    )


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(
    num_requests: int, min_len: int, max_len: int, seed: int, vocab_size: int = PROMPT_ID_LIMIT
) -> list[Request]:
    """`num_requests` requests, input and output lengths uniform in [min_len, max_len]."""
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    id_limit = min(PROMPT_ID_LIMIT, vocab_size)
    requests = []
    for _ in range(num_requests):
        prompt = [rng.randrange(id_limit) for _ in range(rng.randint(min_len, max_len))]
        requests.append(Request(prompt, rng.randint(min_len, max_len)))
    return requests


def save_random_model(config, out_dir: Path, dtype, device, seed: int = 0) -> Path:
    """Random weights for `config`, initialised on `device` (fast on GPU), saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    del model
    if torch.device(device).type == "cuda":
        # Hand the memory back: the engines measured next size their KV caches from what
        # is free, and an 8B model left in this process's allocator cache is 16 GB.
        torch.cuda.empty_cache()
    return out_dir


@dataclass
class RunResult:
    """One system's run of a workload; times in seconds, relative to the run's start."""

    name: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float
    ttft_s: list[float] = field(default_factory=list)  # per request
    itl_s: list[float] = field(default_factory=list)  # every gap between two tokens of a request
    peak_memory_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tps(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        return cls(**json.loads(text))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN when there are no values."""
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def latencies_from_timestamps(
    start: float, token_times: list[list[float]]
) -> tuple[list[float], list[float]]:
    """TTFT per request and every inter-token gap, from each request's token timestamps."""
    ttft = [times[0] - start for times in token_times if times]
    itl = [b - a for times in token_times for a, b in zip(times, times[1:])]
    return ttft, itl


def format_result(r: RunResult) -> str:
    mem = f", peak {r.peak_memory_bytes / 2**30:.1f} GiB" if r.peak_memory_bytes else ""
    return (
        f"{r.name}: {r.num_requests} requests, {r.output_tokens} output tokens in {r.elapsed_s:.2f} s "
        f"-> {r.output_tps:,.0f} output tok/s, {r.total_tps:,.0f} total tok/s; "
        f"TTFT p50 {percentile(r.ttft_s, 50) * 1e3:.0f} ms p99 {percentile(r.ttft_s, 99) * 1e3:.0f} ms; "
        f"ITL p50 {percentile(r.itl_s, 50) * 1e3:.1f} ms p99 {percentile(r.itl_s, 99) * 1e3:.1f} ms{mem}"
    )


def run_ours(
    config,
    workload: list[Request],
    device: str | None = None,
    dtype=None,
    tp: int = 1,
    seed: int = 0,
    model_dir: Path | None = None,
    log: Callable[[str], None] = print,
    **llm_kwargs,
) -> RunResult:
    """Our engine on `workload`; builds a random model dir from `config` unless given one."""
    import tempfile

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if not device.startswith("cuda"):
        # The engine's CPU default (a few full contexts) is tens of GB for long-context
        # shapes such as Qwen3's 40k; a smoke run needs far less.
        llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    with tempfile.TemporaryDirectory(prefix="hf2paged-bench-") as tmp:
        if model_dir is None:
            log(f"building a random {config.model_type} model ({dtype}) ...")
            model_dir = save_random_model(config, Path(tmp), dtype, device, seed)
        return _timed_run_ours(model_dir, workload, device, dtype, tp, log, **llm_kwargs)


def _timed_run_ours(model_dir, workload, device, dtype, tp, log, **llm_kwargs) -> RunResult:
    import torch

    from runtime.engine import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model_dir, tensor_parallel_size=tp, dtype=dtype, device=device, **llm_kwargs)
    startup = _startup_note(llm, time.perf_counter() - started)
    runner = getattr(getattr(llm, "executor", None), "worker", None)
    compiled_model = getattr(getattr(runner, "runner", None), "compiled", None) is not None
    try:
        greedy = [
            SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.max_tokens)
            for r in workload
        ]
        # Warm-up: first-call costs (Triton compilation, CUDA graph capture) are not throughput.
        warm = workload[: min(4, len(workload))]
        short = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)
        llm.generate([r.prompt_token_ids for r in warm], short, use_tqdm=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        log(f"ours: {len(workload)} requests ...")
        compiled_before = _triton_cache_entries()
        token_times: dict[str, list[float]] = {}
        start = time.perf_counter()
        # Token ids only, as the HF baselines return them: no per-step detokenization.
        ids = [
            llm.add_request(r.prompt_token_ids, p, detokenize=False)
            for r, p in zip(workload, greedy)
        ]
        for rid in ids:
            token_times[rid] = []
        # Deltas (one per new token), not whole outputs: what a streaming server reads.
        while llm.has_unfinished_requests():
            deltas = llm.step_tokens()
            now = time.perf_counter()
            for delta in deltas:
                token_times[delta.request_id].append(now)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        compiled = _triton_cache_entries() - compiled_before
    finally:
        _shutdown(llm)
    ttft, itl = latencies_from_timestamps(start, list(token_times.values()))
    return RunResult(
        name=f"hf2paged (ours, tp={tp}{', compiled' if compiled_model else ''})",
        num_requests=len(workload),
        input_tokens=sum(len(r.prompt_token_ids) for r in workload),
        output_tokens=sum(len(t) for t in token_times.values()),
        elapsed_s=elapsed,
        ttft_s=ttft,
        itl_s=itl,
        peak_memory_bytes=peak,
        notes=[
            startup,
            f"Triton kernels compiled during the timed run (new cache entries): {compiled}",
        ]
        if device.startswith("cuda")
        else [startup],
    )


def _startup_note(llm, seconds: float) -> str:
    """Engine start-up time, with rank 0's warm-up (kernel and torch.compile
    compilation) and CUDA-graph capture where it recorded them."""
    runner = getattr(getattr(getattr(llm, "executor", None), "worker", None), "runner", None)
    parts = []
    if runner is not None:
        timings = getattr(runner, "startup_seconds", {})
        compiled = getattr(runner, "compiled", None) is not None
        if "warm_up" in timings:
            what = "kernel warm-up incl. torch.compile" if compiled else "kernel warm-up"
            parts.append(f"{what} {timings['warm_up']:.1f} s")
        if "cuda_graphs" in timings:
            parts.append(f"CUDA graphs {timings['cuda_graphs']:.1f} s")
        if not compiled:
            parts.append("model not compiled")
    detail = f" ({', '.join(parts)})" if parts else ""
    budget = getattr(getattr(llm, "config", None), "max_num_batched_tokens", None)
    budget = f"; token budget {budget} per step" if budget else ""
    return f"engine start-up {seconds:.1f} s{detail}{budget}"


def _triton_cache_entries() -> int:
    """Entries in Triton's on-disk kernel cache: each new one is a compilation (a kernel
    variant first met), whichever process of the engine made it."""
    path = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".triton", "cache"
    )
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return 0


def _shutdown(llm) -> None:
    close = getattr(llm, "shutdown", None) or getattr(llm, "close", None)
    if close is not None:
        close()
