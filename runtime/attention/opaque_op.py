"""``torch.ops.hf2paged.paged_attention``: one attention layer's step as an operator that
``torch.compile`` does not look into.

Inside a compiled region `PagedAttention` calls this operator instead of its backend:
the compiler fuses everything around it (norms, rotary embedding, activations, residual
adds) and leaves the store + attend to the Triton kernels, which read host-side facts
of the step (query lengths, the longest query) that must not become part of a traced
graph. Those come from `runtime.attention.forward_context` when the operator runs; the
layer's score parameters are plain arguments, constant per layer, so layers with equal
parameters share one compiled graph. ``kv_cache`` is declared mutated (the step's K/V
are stored into it). vLLM registers its ``unified_attention`` the same way.
"""

from __future__ import annotations

import functools

import torch

from runtime.attention.backend import store_and_attend
from runtime.attention.forward_context import require_step_metadata
from runtime.attention.params import Alibi, AttentionParams


@torch.library.custom_op("hf2paged::paged_attention", mutates_args=("kv_cache",))
def paged_attention_op(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, Dv]
    kv_cache: torch.Tensor,  # runtime.attention.kv_layout.kv_cache_shape(...)
    sinks: torch.Tensor | None,  # [Hq] fp32
    alibi_slopes: torch.Tensor | None,  # [Hq] fp32
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    alibi_scale: float,
    alibi_bf16: bool,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:  # [T, Hq, Dv]
    """`store_and_attend` with the current step's metadata (`forward_context`)."""
    if alibi_slopes is None:
        params = _params(scale, sliding_window, logits_soft_cap, attention_chunk_size)
    else:
        dtype = torch.bfloat16 if alibi_bf16 else torch.float32
        params = AttentionParams(
            scale, sliding_window, logits_soft_cap, Alibi(alibi_slopes, alibi_scale, dtype),
            attention_chunk_size=attention_chunk_size,
        )  # fmt: skip
    return store_and_attend(query, key, value, kv_cache, require_step_metadata(), params, sinks)


@paged_attention_op.register_fake
def _(query, key, value, kv_cache, sinks, alibi_slopes, scale, sliding_window,
      logits_soft_cap, alibi_scale, alibi_bf16, attention_chunk_size=None):  # fmt: skip
    return query.new_empty(query.shape[0], query.shape[1], value.shape[2])


@functools.lru_cache(maxsize=64)
def _params(
    scale: float, sliding_window: int | None, cap: float | None, chunk: int | None
) -> AttentionParams:
    return AttentionParams(
        scale, sliding_window=sliding_window, logits_soft_cap=cap, attention_chunk_size=chunk
    )


def opaque_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, Dv]
    kv_cache: torch.Tensor,
    params: AttentionParams,
    sinks: torch.Tensor | None,  # [Hq] fp32
) -> torch.Tensor:  # [T, Hq, Dv]
    """`paged_attention_op` called with `params` spelled out as its arguments."""
    alibi = params.alibi
    return paged_attention_op(
        query, key, value, kv_cache, sinks,
        None if alibi is None else alibi.slopes,
        params.scale, params.sliding_window, params.logits_soft_cap,
        1.0 if alibi is None else alibi.scale,
        alibi is not None and alibi.rounds_bf16,
        params.attention_chunk_size,
    )  # fmt: skip
