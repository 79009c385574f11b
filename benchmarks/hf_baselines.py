"""transformers baselines for the throughput benchmark: padded static batches and continuous batching.

Both run greedy and generate exactly each request's output length, like ours.

- `generate` with static batches (left-padded, `batch_size` requests at a time): every
  request of a batch runs until the batch's longest output is done, so it computes
  padding; only each request's own tokens count as output ("useful" tokens).
- Continuous batching (`generation/continuous_batching/`): the manager from
  `model.continuous_batching_context_manager(...)`, with per-request `max_new_tokens` and
  `eos_token_id=-1` through `add_request`, as `generate_batch` does internally (which
  takes one `max_new_tokens` for all). CUDA graphs on when this transformers knows
  `ContinuousBatchingConfig(use_cuda_graph=...)`. Warm-up (graph capture) happens when
  the context is entered, before the clock starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hf2paged.bench import Request, RunResult, latencies_from_timestamps


def load_hf_model(model_dir, dtype, device, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    # device_map puts the weights straight on the GPU (no host copy of an 8B model first).
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, device_map=str(device)
    )
    return model.eval()


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


@torch.inference_mode()
def run_hf_static(
    model,
    workload: list[Request],
    batch_size: int = 64,
    max_batches: int | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """`model.generate` over consecutive batches of `batch_size` requests, left-padded."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = model.device
    batches = [workload[i : i + batch_size] for i in range(0, len(workload), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    pad_id = 0  # any id: padded positions are masked out

    class StepClock(StoppingCriteria):
        """Records when each step's token exists (generate syncs every step anyway)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    # Warm-up on a small batch: cuBLAS handles, SDPA kernel selection.
    warm = batches[0][:2]
    _generate(model, warm, 8, pad_id, device, None)
    _reset_peak(device)
    token_times: list[list[float]] = []
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        clock = StepClock()
        new_tokens = max(r.max_tokens for r in batch)
        log(
            f"  HF generate batch {i + 1}/{len(batches)}: {len(batch)} requests, {new_tokens} steps"
        )
        _generate(model, batch, new_tokens, pad_id, device, StoppingCriteriaList([clock]))
        assert len(clock.times) == new_tokens, (len(clock.times), new_tokens)
        token_times.extend(clock.times[: r.max_tokens] for r in batch)
    elapsed = time.perf_counter() - start
    ttft, itl = latencies_from_timestamps(start, token_times)
    used = [r for b in batches for r in b]
    return RunResult(
        name=f"HF generate (static batches of {batch_size}, padded)",
        num_requests=len(used),
        input_tokens=sum(len(r.prompt_token_ids) for r in used),
        output_tokens=sum(r.max_tokens for r in used),
        elapsed_s=elapsed,
        ttft_s=ttft,
        itl_s=itl,
        peak_memory_bytes=_peak(device),
        notes=[f"{model.config._attn_implementation} attention, DynamicCache"]
        + (
            [f"measured on the first {len(used)} of {len(workload)} requests"]
            if len(used) < len(workload)
            else []
        ),
    )


def _generate(model, batch: list[Request], new_tokens: int, pad_id: int, device, stopping) -> None:
    longest = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # [B, Lmax]
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):  # left padding: generation continues right after each prompt
        ids[row, longest - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[row, longest - len(r.prompt_token_ids) :] = 1
    model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # suppresses EOS: every request runs its full length
        pad_token_id=pad_id,
        stopping_criteria=stopping,
    )
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cb_support() -> tuple[bool, bool]:
    """(continuous batching available, `ContinuousBatchingConfig(use_cuda_graph=)` available)."""
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
    except ImportError:
        return False, False
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        return True, False
    return True, hasattr(ContinuousBatchingConfig, "use_cuda_graph")


def _cb_attention(model) -> None:
    """transformers < 5.23 needs the `paged|` prefix to run sdpa over the paged cache;
    later ones take plain `sdpa` and warn about the prefix."""
    import transformers
    from packaging.version import Version

    if (
        Version(transformers.__version__) < Version("5.23")
        and model.config._attn_implementation == "sdpa"
    ):
        model.set_attn_implementation("paged|sdpa")


@torch.inference_mode()
def run_hf_continuous(
    model, workload: list[Request], log: Callable[[str], None] = print, timeout_s: float = 3600
) -> RunResult:
    """transformers' continuous batching manager (paged KV cache) on the whole workload."""
    from transformers import GenerationConfig

    available, has_graph_flag = cb_support()
    if not available:
        raise RuntimeError(
            "this transformers has no continuous batching (generation/continuous_batching)"
        )
    on_cuda = model.device.type == "cuda"
    gen_config = GenerationConfig(
        do_sample=False, max_new_tokens=max(r.max_tokens for r in workload), eos_token_id=-1
    )
    kwargs: dict = {}
    notes = []
    if has_graph_flag:
        from transformers import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(use_cuda_graph=on_cuda)
        notes.append(f"ContinuousBatchingConfig(use_cuda_graph={on_cuda})")
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(len(r.prompt_token_ids) for r in workload),
            max_generated_length=gen_config.max_new_tokens,
            num_requests=len(workload),
        )
    except ImportError:
        pass
    _cb_attention(model)
    log("  HF continuous batching: warm-up (graph capture) ...")
    token_times: dict[str, list[float]] = {}
    outputs: dict[str, int] = {}
    with model.continuous_batching_context_manager(
        generation_config=gen_config, block=True, timeout=30, **kwargs
    ) as manager:
        attn = model.config._attn_implementation
        # Warm-up requests through the running manager: first-step costs (lazy kernel
        # loading, allocator growth) are not throughput; ours and HF generate warm up too.
        for i, r in enumerate(workload[:4]):
            manager.add_request(
                r.prompt_token_ids, request_id=f"warm{i}", max_new_tokens=4, eos_token_id=-1
            )
        _collect(manager, 4, timeout_s)
        _reset_peak(model.device)
        log(f"  HF continuous batching ({attn}): {len(workload)} requests ...")
        start = time.perf_counter()
        for i, r in enumerate(workload):
            manager.add_request(
                r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.max_tokens,
                record_timestamps=True, eos_token_id=-1,
            )  # fmt: skip
        for result in _collect(manager, len(workload), timeout_s):
            outputs[result.request_id] = len(result.generated_tokens)
            token_times[result.request_id] = list(result.timestamps or [])
        elapsed = time.perf_counter() - start
        peak = _peak(model.device)
    ttft, itl = latencies_from_timestamps(start, list(token_times.values()))
    return RunResult(
        name="HF continuous batching",
        num_requests=len(workload),
        input_tokens=sum(len(r.prompt_token_ids) for r in workload),
        output_tokens=sum(outputs.values()),
        elapsed_s=elapsed,
        ttft_s=ttft,
        itl_s=itl,
        peak_memory_bytes=peak,
        notes=[f"{attn} attention"] + notes,
    )


def _collect(manager, count: int, timeout_s: float) -> list:
    """The next `count` finished results of `manager`; raises if it stops or fails."""
    done = []
    deadline = time.perf_counter() + timeout_s
    while len(done) < count:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running() or time.perf_counter() > deadline:
                raise RuntimeError(
                    f"HF continuous batching stopped after {len(done)} of {count} requests"
                )
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(
                    f"HF continuous batching failed request {result.request_id}: {result.error}"
                )
            done.append(result)
    return done
