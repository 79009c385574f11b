"""Compile every attention-kernel variant a serving run can ask for before it starts.

Triton compiles a kernel the first time it meets a new combination of compile-time
constants. Most are fixed per model (head layout, dtype, block size), but the decode
kernel's split count and pipeline depth follow the number of sequences decoding in a
step, and steps that mix prompt chunks with decodes use the variants that pick their
sequences through an id list. Left to the first steps that need them, these compilations
land inside serving (each a second or so on a GPU host), right when the first requests
wait for their first token. The same holds for torch.compile of a compiled model's
blocks (runtime/engine/compile.py): its first step here traces and compiles them. `warm_up_kernels` runs one dummy step per variant instead:
the decode variants come from the same `choose_num_splits` / `decode_stages` the kernel
launcher uses, so the list stays right when the heuristic changes.

Mixture-of-experts layers (`FusedMoE`) pick their expert kernels' launch configuration
from the step's token count, up to the token budget: after the dummy steps (which tell
each layer its routing width), each distinct layer runs its kernels once per configuration
(`FusedMoE.warm_up`).

Dummy rows store nothing (slot -1) and read one key of block 0, like the padding rows of
CUDA-graph batches; their outputs are never read. Under tensor parallelism every rank
runs the same steps in the same order, so the model's all-reduces pair up.
"""

from __future__ import annotations

import torch

from runtime.attention.layer import attention_layers
from runtime.attention.triton_config import DecodeConfig, choose_num_splits, decode_stages
from runtime.engine.step_inputs import StepInputs
from runtime.moe.layer import FusedMoE


def decode_variant_sizes(
    max_num_seqs: int, kv_head_counts: set[int], device: torch.device
) -> list[int]:
    """The smallest decode batch size of each distinct (split count, stage count) of the
    decode kernel, over every KV head count of the model's layers."""
    config = DecodeConfig()
    first_size: dict[tuple, int] = {}
    for batch in range(1, max_num_seqs + 1):
        key = []
        for heads in sorted(kv_head_counts):
            splits = choose_num_splits(batch, heads, device, config)
            key.append((heads, splits, decode_stages(batch * heads * splits, device, config)))
        first_size.setdefault(tuple(key), batch)
    return sorted(first_size.values())


def dummy_step(num_decode: int, prefill_len: int, block_size: int) -> StepInputs:
    """`num_decode` one-token rows and, when `prefill_len` > 1, one prompt chunk of that
    many tokens (at most `block_size`), all in block 0; nothing is stored and nothing
    samples."""
    query_lens = [prefill_len] * (prefill_len > 1) + [1] * num_decode
    num_seqs = len(query_lens)
    step = StepInputs.build([[0]] * num_seqs, [0] * num_seqs, query_lens, block_size,
                            logits_indices=[])  # fmt: skip
    step.slot_mapping.fill(-1)  # store nothing: block 0 may belong to a sequence
    return step


def warm_up_steps(
    model, max_num_seqs: int, block_size: int, device: torch.device, compiled: bool = False
):
    """The dummy steps that together meet every kernel variant: a lone prompt chunk, and
    for each decode variant a decode-only step and one mixed with a prompt chunk. A
    `compiled` model first runs a full decode batch: torch.compile traces its blocks on
    that call, and Inductor tunes its kernels for the sizes it sees there (a batch of
    decodes, the engine's commonest step, rather than a two-token prompt)."""
    kv_heads = {layer.num_kv_heads for layer in attention_layers(model)}
    chunk = min(2, block_size)  # a prompt chunk inside block 0
    steps = [dummy_step(max_num_seqs, 0, block_size)] if compiled and max_num_seqs > 1 else []
    steps.append(dummy_step(0, chunk, block_size))
    for size in decode_variant_sizes(max_num_seqs, kv_heads, device):
        steps += [dummy_step(size, 0, block_size), dummy_step(size, chunk, block_size)]
    return steps


def warm_up_experts(model, max_num_batched_tokens: int) -> int:
    """`FusedMoE.warm_up` on one layer of each kernel variant (after a step has run);
    returns how many expert runs that took."""
    runs, seen = 0, set()
    for layer in model.modules():
        if isinstance(layer, FusedMoE) and layer.kernel_variant() not in seen:
            seen.add(layer.kernel_variant())
            runs += layer.warm_up(max_num_batched_tokens)
    return runs


@torch.inference_mode()
def warm_up_kernels(runner, max_num_seqs: int, max_num_batched_tokens: int | None = None) -> int:
    """Run the warm-up steps eagerly on `runner` (a `ModelRunner` without graphs yet), then
    the expert kernels' variants up to `max_num_batched_tokens` (None: none); returns how
    many steps and expert runs that took."""
    steps = warm_up_steps(
        runner.model, max_num_seqs, runner.block_size, runner.device, runner.compiled is not None
    )
    for inputs in steps:
        ids, pos, metadata = runner.tensors(inputs)
        runner.forward(ids, pos, runner.kv_caches, metadata)
    expert_runs = 0
    if max_num_batched_tokens:
        expert_runs = warm_up_experts(runner.model, max_num_batched_tokens)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return len(steps) + expert_runs
