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

        def run(**kwargs):
            options = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
            self.seen.add((self.name, tuple(sorted(options.items()))))
            return launch(**kwargs)

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
