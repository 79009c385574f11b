"""Triton backend of `PagedAttention`: host entry points `reshape_and_cache` and
`paged_attention`, with exactly the semantics of `runtime.attention.reference`.

Kernels live beside this file: `triton_cache` (store K/V by slot), `triton_prefill`
(varlen prefill and chunked prefill over the paged cache), `triton_decode` (split-KV
decode) and `triton_reduce` (its log-sum-exp merge of the splits).
"""

from __future__ import annotations

import torch

from runtime.attention.kv_layout import split_kv_cache
from runtime.attention.metadata import InputMetadata
from runtime.attention.params import AttentionParams
from runtime.attention.sdpa_prefill import attend_fresh_prompts
from runtime.attention.triton_cache import reshape_and_cache
from runtime.attention.triton_common import check_attention_args
from runtime.attention.triton_config import (
    FRESH_PROMPT_SDPA_MIN_TOKENS,
    DecodeConfig,
    PrefillConfig,
)
from runtime.attention.triton_decode import paged_decode
from runtime.attention.triton_prefill import paged_prefill

__all__ = ["paged_attention", "reshape_and_cache"]


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W], this step's K/V stored
    metadata: InputMetadata,
    params: AttentionParams,
    sinks: torch.Tensor | None = None,  # [Hq] fp32
    *,
    num_splits: int | None = None,
    decode_config: DecodeConfig | None = None,
    prefill_config: PrefillConfig | None = None,
    sdpa_min_tokens: int | None = None,
) -> torch.Tensor:  # [T, Hq, Dv]
    """Causal attention of every new token over its sequence's cached context, as
    `paged_attention_ref` computes it (scores as `AttentionParams` states).

    Sequences with one new token go to the split-KV decode kernel, the others to the
    prefill kernel; one batch may mix both. When every sequence decodes
    (``metadata.num_prefill_tokens == 0``) no host list is read and nothing syncs with
    the device, so the call can be captured in a CUDA graph (see `paged_decode` for
    what a capture must hold fixed). Mixed batches split by `metadata.decode_ids` /
    `prefill_ids`, which the step inputs carry (see `InputMetadata.mixed_split`). Fresh
    prompts (no cached context) of ``sdpa_min_tokens`` tokens or more (default
    `FRESH_PROMPT_SDPA_MIN_TOKENS`) go to cuDNN where it applies (`sdpa_prefill`); only
    steps with such a long query read host lists.

    ``num_splits`` / ``*_config`` / ``sdpa_min_tokens`` override the heuristics (tests,
    tuning).
    """
    alibi = params.alibi
    slopes = None if alibi is None else alibi.slopes
    check_attention_args(query, kv_cache, slopes, sinks)
    v_head_dim = split_kv_cache(kv_cache, query.shape[2])[1].shape[-1]
    out = query.new_empty(query.shape[0], query.shape[1], v_head_dim)  # [T, Hq, Dv]
    if query.shape[0] == 0:
        return out
    common = dict(
        scale=params.scale,
        sliding_window=params.sliding_window,
        attention_chunk_size=params.attention_chunk_size,
        alibi_slopes=slopes,
        logits_soft_cap=params.logits_soft_cap,
        sinks=sinks,
        alibi_scale=1.0 if alibi is None else alibi.scale,
        alibi_bf16=alibi is not None and alibi.rounds_bf16,
    )
    tensors = (metadata.block_tables, metadata.seq_lens, metadata.query_start_loc)
    if metadata.num_prefill_tokens == 0:
        assert query.shape[0] == metadata.num_seqs, "a decode-only batch has one token per sequence"
        paged_decode(
            out, query, kv_cache, *tensors, None,
            num_splits=num_splits, config=decode_config, **common,
        )  # fmt: skip
        return out
    prefill_ids = None  # every sequence prefills: no index tensor
    if metadata.num_prefill_tokens < query.shape[0]:
        # Mixed batch: decodes and prefills each through their kernel, over the sequence
        # ids the step inputs carry (built on the host once per step, never per layer).
        decode_ids, prefill_ids = metadata.mixed_split()
        paged_decode(
            out, query, kv_cache, *tensors, decode_ids,
            num_splits=num_splits, config=decode_config, **common,
        )  # fmt: skip
    # The longest prefill query is the batch's: decodes have one token.
    max_len = metadata.max_query_len
    min_tokens = FRESH_PROMPT_SDPA_MIN_TOKENS if sdpa_min_tokens is None else sdpa_min_tokens
    if max_len >= min_tokens:  # long fresh prompts may go to cuDNN
        query_lens = metadata.host_query_lens()
        host_ids = [b for b, n in enumerate(query_lens) if n > 1]
        left = attend_fresh_prompts(
            out, query, kv_cache, metadata, params, sinks, host_ids, sdpa_min_tokens
        )
        if not left:
            return out
        if len(left) < len(host_ids):
            prefill_ids = torch.tensor(left, dtype=torch.int32).to(query.device)
            max_len = max(query_lens[b] for b in left)
    paged_prefill(
        out, query, kv_cache, *tensors, prefill_ids, max_len,
        config=prefill_config, **common,
    )  # fmt: skip
    return out
