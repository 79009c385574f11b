"""The engine's kernel warm-up meets every attention-kernel variant that serving asks for.

Under the Triton interpreter the kernels' launch arguments are recorded; the variant of a
launch is what Triton compiles a kernel for: its compile-time constants (upper-case
arguments) and launch options. After `warm_up_kernels`, mixed prefill/decode serving with
chunked prompts must not meet a variant the warm-up did not."""

from __future__ import annotations

import pytest
import torch
from engine_models import build_model_dir

import runtime.attention.triton_decode as triton_decode
import runtime.attention.triton_prefill as triton_prefill
from runtime.engine import LLM, SamplingParams
from runtime.engine.kernel_warmup import decode_variant_sizes, warm_up_kernels

KERNELS = [
    (triton_decode, "paged_decode_kernel"),
    (triton_decode, "decode_reduce_kernel"),
    (triton_prefill, "paged_prefill_kernel"),
]


class Recorder:
    """Stands in for a Triton kernel: records each launch's variant, then launches."""

    def __init__(self, kernel, name: str, seen: set) -> None:
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            options = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
            self.seen.add((self.name, tuple(sorted(options.items()))))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def record(monkeypatch):
    monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", "triton")
    seen: set = set()
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name), name, seen))
    return seen


def test_decode_variant_sizes_cover_each_split_and_stage_count() -> None:
    device = torch.device("cpu")  # the interpreter's stand-in GPU has 4 SMs
    sizes = decode_variant_sizes(8, {2}, device)
    assert sizes == [1, 2, 3, 5]  # splits 4, 2, 1 (3 stages), then 1 with 2 stages
    assert decode_variant_sizes(8, {2, 1}, device)[:3] == [1, 2, 3]


@pytest.mark.parametrize("warm_up_seqs", [6, 1])
def test_serving_meets_no_variant_the_warm_up_missed(tmp_path, record, warm_up_seqs) -> None:
    model_dir, _ = build_model_dir("llama", tmp_path)
    llm = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=6,
              max_num_batched_tokens=12)  # fmt: skip
    warm_up_kernels(llm.executor.worker.runner, warm_up_seqs)
    warmed = set(record)
    record.clear()
    prompts = [list(range(3, 3 + n)) for n in (9, 2, 14, 5, 3, 7)]
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 9, 3, 7, 5, 4)
    ]
    llm.generate(prompts, params, use_tqdm=False)
    served = set(record)
    mixed = {v for v in served if v[0] == "paged_decode_kernel" and dict(v[1])["HAS_SEQ_IDS"]}
    assert mixed, "the workload must mix prompt chunks with decodes"
    if warm_up_seqs == 6:  # the engine's max_num_seqs: nothing left to compile
        assert served <= warmed, sorted(served - warmed)
    else:  # warming up for one sequence only misses the larger batches' variants
        assert not served <= warmed


def test_expert_config_counts_are_each_configs_first_token_count(monkeypatch) -> None:
    from runtime.moe import triton_config
    from runtime.moe.triton_config import config_change_token_counts, default_moe_config

    gpu = torch.device("cuda")  # the heuristics read only the limits patched here
    monkeypatch.setattr(triton_config, "device_limits", lambda device: (227 * 1024, 132))
    shape = (8, 128, 2048, 768, torch.bfloat16, gpu)  # top-k, experts, H, I (Qwen3-30B-A3B)
    counts = config_change_token_counts(8192, *shape)
    config = {n: default_moe_config(n, *shape) for n in range(1, 8193)}
    assert counts[0] == 1 and len(counts) == len(set(config.values())) > 4
    assert {config[n] for n in counts} == set(config.values())
    for n in counts[1:]:  # each listed count is the first to select its configuration
        assert config[n] not in {config[m] for m in range(1, n)}


EXPERT_KERNELS = ["_gate_up_kernel", "_down_kernel", "_sum_kernel"]


def test_serving_meets_no_expert_kernel_variant_the_warm_up_missed(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE (8 experts, top-2) on the Triton experts path, with a GPU's launch
    heuristics: after warm-up, serving steps of every size up to the token budget compile
    nothing new; without the expert warm-up the long prompt's step (over 64 tokens: 16+
    pairs per expert, a taller tile) would."""
    from engine_models import build_tiny_dir

    import runtime.moe.triton_ops as moe_ops
    from runtime.moe import triton_config

    monkeypatch.setenv("HF2PAGED_MOE_BACKEND", "triton")
    monkeypatch.setattr(triton_config, "device_limits", lambda device: (227 * 1024, 64))
    seen: set = set()
    for name in EXPERT_KERNELS:
        monkeypatch.setattr(moe_ops, name, Recorder(getattr(moe_ops, name), name, seen))
    model_dir = build_tiny_dir("qwen3_moe", tmp_path)
    llm = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=6,
              max_num_batched_tokens=80)  # fmt: skip
    runner = llm.executor.worker.runner
    warm_up_kernels(runner, 6)  # the attention variants only
    steps_only = set(seen)
    warm_up_kernels(runner, 6, 80)
    warmed = set(seen)
    assert warmed > steps_only, "the expert warm-up must add the larger steps' variants"
    seen.clear()
    prompts = [list(range(3, 3 + n)) for n in (70, 2, 14, 5, 3, 7)]
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 9, 3, 7, 5, 4)
    ]
    llm.generate(prompts, params, use_tqdm=False)
    assert seen - steps_only, "the workload must meet a variant the steps alone miss"
    assert seen <= warmed, sorted(seen - warmed)
