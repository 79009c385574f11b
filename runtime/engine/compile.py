"""`CompiledModel`: a generated model whose repeated blocks run through ``torch.compile``.

A decoder layer in eager mode launches one kernel per elementwise op: an RMSNorm in
bf16 is five (cast, square, mean, rsqrt-multiply, weight), rotary embedding and the
q/k norms another dozen, SiLU-and-multiply and the residual adds more; on an H200 they
were half the GPU time of a mixed step and a third of a decode step's non-attention
time (benchmarks/results/step-breakdown-nvidia-h200.md). Inductor fuses them into a
few kernels per layer for every architecture the converter emits, with nothing
written per model: residual add + norm, q/k norms + rotary, activation-and-multiply.

What is compiled: each block of the model's repeated stack, i.e. every child of an
``nn.ModuleList`` that contains a `PagedAttention` (regional compilation, as
torch's own recipe for transformers): the blocks share one code object, so torch
traces and compiles one graph and reuses it for every layer with equal constants (a
second variant where layers differ, e.g. sliding-window layers). Embedding, rotary
tables, the final norm and the logits stay eager: a few kernels per step.

What is not compiled: the attention itself is one opaque operator
(`runtime.attention.opaque_op`) whose host-side inputs come from the step's forward
context, set here around each model call; tensor-parallel all-reduces and `FusedMoE`
are graph breaks (they run eagerly between compiled pieces).

Shapes: the token count is marked dynamic on the first call, so one graph serves every
batch; steps of fewer than `MIN_COMPILED_TOKENS` tokens run the blocks eagerly (torch
specialises sizes 0 and 1, which would compile a second graph; the engine pads one-
sequence decodes to two rows instead, see cuda_graphs.py). Decode steps replay CUDA
graphs captured over the compiled blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from runtime.attention.forward_context import current_step_metadata, step_metadata
from runtime.attention.layer import PagedAttention
from runtime.attention.metadata import InputMetadata

log = logging.getLogger(__name__)

# torch specialises a dimension of size 0 or 1: such steps run eagerly.
MIN_COMPILED_TOKENS = 2

# HF2PAGED_COMPILE: "0" never compiles, "1" compiles wherever the engine runs on CUDA
# (tensor parallelism included); unset: the engine's default (EngineConfig.use_compile).
COMPILE_ENV = "HF2PAGED_COMPILE"


def compile_requested(default: bool) -> bool:
    """`default`, unless ``HF2PAGED_COMPILE`` says 0 or 1."""
    value = os.environ.get(COMPILE_ENV, "").strip()
    if value in ("", "auto"):
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{COMPILE_ENV}={value!r}; expected 0, 1 or auto")
    return value == "1"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Every child of an ``nn.ModuleList`` of `model` that contains a `PagedAttention`,
    outermost first (a block's own sub-lists are not searched)."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for item in child:
                    if any(isinstance(m, PagedAttention) for m in item.modules()):
                        blocks.append(item)
                    else:
                        visit(item)
            else:
                visit(child)

    visit(model)
    return blocks


class CompiledBlock:
    """A block's ``forward``: compiled for steps of `MIN_COMPILED_TOKENS` tokens or more,
    eager below that or outside a `CompiledModel` call."""

    def __init__(self, forward: Callable, backend: str | Callable, owner: CompiledModel) -> None:
        self.eager = forward
        self.compiled = torch.compile(forward, backend=backend, dynamic=None)
        self.owner = owner

    def __call__(self, *args, **kwargs):
        metadata = current_step_metadata()
        if metadata is None or metadata.num_tokens < MIN_COMPILED_TOKENS:
            return self.eager(*args, **kwargs)
        mark_token_dims((args, kwargs), metadata.num_tokens, self.owner.kv_cache_ids)
        return self.compiled(*args, **kwargs)


def mark_token_dims(inputs, num_tokens: int, skip: frozenset[int]) -> None:
    """Mark the token dimension of the input tensors as dynamic, so the first trace is
    already general in the token count (a hint: a dimension the graph pins to a constant
    stays static). The token dimension is a tensor's first dimension of size
    `num_tokens` (hidden states are [1, T, H], positions [1, T]; a step compiles from 2
    tokens on, so the leading 1 never matches). Only that one: a step whose token count
    happens to equal a later size (the hidden size, a head count) must not mark it too,
    or the tensor is marked differently from call to call, its guards fail and the block
    is traced again. Tensors whose id is in `skip` (the KV caches, whose sizes never
    follow the step) are left alone."""
    for leaf in torch.utils._pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and id(leaf) not in skip:
            token_dim = next((d for d, size in enumerate(leaf.shape) if size == num_tokens), None)
            if token_dim is not None:
                torch._dynamo.maybe_mark_dynamic(leaf, token_dim)


class CompiledModel:
    """Calls ``model(input_ids, positions, kv_caches, metadata)`` with its repeated
    blocks compiled (`repeated_blocks`) and the step's metadata set for the opaque
    attention operator. Compilation happens on the first call of each block variant
    (the engine's warm-up makes that call, kernel_warmup.py).

    The blocks' ``forward`` is replaced on the instances (parameters, state dict and the
    model's own code are untouched); `restore` puts the eager one back.
    """

    def __init__(self, model: nn.Module, backend: str | Callable = "inductor") -> None:
        self.model = model
        self.kv_cache_ids: frozenset[int] = frozenset()
        self.blocks = repeated_blocks(model)
        for block in self.blocks:
            block.forward = CompiledBlock(block.forward, backend, self)

    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        metadata: InputMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        self.kv_cache_ids = frozenset(map(id, kv_caches))
        with step_metadata(metadata):
            return self.model(input_ids, positions, kv_caches, metadata)

    def restore(self) -> None:
        """Run the blocks eagerly again (their instance ``forward`` removed)."""
        for block in self.blocks:
            if isinstance(block.__dict__.get("forward"), CompiledBlock):
                del block.__dict__["forward"]
        self.blocks = []
