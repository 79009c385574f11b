"""`EngineConfig`: everything a worker needs to build its model and cache (picklable)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.engine.compile import compile_requested

# Attributes transformers configs use for the longest sequence the model was trained on.
_CONTEXT_ATTRS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


def model_context_length(config) -> int | None:
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# The scheduler's token budget per step (max_num_batched_tokens) when none is given. On
# a GPU a larger budget makes fewer, longer mixed prefill/decode steps: more throughput
# offline, but every streaming client waits out each long step, so a server keeps it
# smaller (vLLM chooses the same way: 16384 for its offline LLM class, 8192 for its
# OpenAI server). One H200, throughput.py's workload, one engine
# (benchmarks/results/engine-knobs-nvidia-h200*.md): Qwen3-0.6B shape 15,440 output tok/s
# at 16384 vs 15,268 / 15,388 at 8192; Llama-3-8B shape 9,878 / 9,872 vs 9,807 / 9,861,
# with its longest step 2x as long (a 16384-token step ~390 ms vs ~195 ms). On the CPU
# a step's cost grows with its tokens and nothing is gained.
TOKEN_BUDGET_OFFLINE = 16384
TOKEN_BUDGET_SERVING = 8192
TOKEN_BUDGET_CPU = 2048


def default_token_budget(device_type: str, serving: bool = False) -> int:
    """`max_num_batched_tokens` when none is given (see TOKEN_BUDGET_OFFLINE)."""
    if device_type != "cuda":
        return TOKEN_BUDGET_CPU
    return TOKEN_BUDGET_SERVING if serving else TOKEN_BUDGET_OFFLINE


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device}; use 'cuda' or 'cpu'")
    return device


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None, config, device: torch.device) -> torch.dtype:
    """`dtype` if given (not "auto"); else float32 on CPU (reference numerics) and the checkpoint's
    half-precision dtype on CUDA (bfloat16 when the checkpoint is float32)."""
    if dtype == "auto":
        dtype = None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        resolved = _DTYPES[dtype]
    elif device.type == "cpu":
        resolved = torch.float32
    else:
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = _DTYPES.get(stored)
        resolved = stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {resolved}")
    return resolved


@dataclass
class EngineConfig:
    """Resolved engine settings, shared by rank 0 and the TP worker processes."""

    model: Path
    tensor_parallel_size: int
    dtype: torch.dtype
    device_type: str  # "cuda" or "cpu"; each rank picks its own device index
    block_size: int
    gpu_memory_utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int  # the model's context length (the KV budget may lower it further)
    enable_prefix_caching: bool
    enforce_eager: bool
    kv_cache_memory_bytes: int | None
    dist_init_method: str | None = None  # tcp://host:port for TP > 1
    # transformers may run the model directory's own config/tokenizer code
    trust_remote_code: bool = False
    # the generated class to build (None: the registry's); pickled by name to TP ranks
    model_class: type | None = None
    # mixture-of-experts layers place whole experts per rank instead of a slice of
    # every expert (runtime.parallel.init_parallel(expert_parallel=...))
    expert_parallel: bool = False

    @property
    def use_cuda_graphs(self) -> bool:
        if self.device_type != "cuda" or self.enforce_eager:
            return False
        if self.tensor_parallel_size == 1:
            return True
        # TP > 1: the ranks capture in lockstep and agree after every capture (see
        # cuda_graphs.py); HF2PAGED_TP_CUDA_GRAPHS=0 decodes eagerly instead.
        return os.environ.get("HF2PAGED_TP_CUDA_GRAPHS", "1") != "0"

    @property
    def use_compile(self) -> bool:
        """torch.compile the model's blocks (runtime/engine/compile.py): on CUDA without
        `enforce_eager`, by default at TP=1 (one H200, Qwen3-0.6B shape, throughput.py:
        12,916 -> 17,646 output tok/s, start-up +8 s; under tensor parallelism the
        all-reduces are graph breaks and it is not measured yet). ``HF2PAGED_COMPILE=0``
        or ``1`` overrides the default; never on CPU, where tests and CI would pay the
        compile time."""
        if self.device_type != "cuda" or self.enforce_eager:
            return False
        return compile_requested(default=self.tensor_parallel_size == 1)
