"""Fresh prompts through torch SDPA's cuDNN attention (CUDA, 16-bit).

A prompt whose tokens are all new in this step (no cached context before them, unlike a
chunk after earlier chunks or a prefix-cache hit) attends only to its own keys: plain
causal attention, which cuDNN's fused kernel runs fastest on Hopper. On an H200, for
one prompt of 4096 tokens (32/8 heads, head_dim 128, bf16), this handoff took 295 µs,
SDPA's cuDNN alone on contiguous K/V 258 µs, the paged Triton prefill kernel 428 µs
(benchmarks/results/compile-nvidia-h200.md). `attend_fresh_prompts` hands such prompts
of at least `FRESH_PROMPT_SDPA_MIN_TOKENS` tokens to it, per sequence (SDPA takes no
ragged batch), with their keys and values gathered from the cache; shorter prompts,
where a launch and a gather per sequence cost more than they save (eight prompts of
1024 tokens: 623 µs handed off, 298 µs in one kernel launch), and every score feature
cuDNN does not have here (ALiBi, soft-capping, sinks, a sliding window or an attention
chunk shorter than the prompt) stay on the Triton kernel.
A configuration cuDNN refuses is remembered and not asked again.
"""

from __future__ import annotations

import logging
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.attention.kv_layout import split_kv_cache
from runtime.attention.metadata import InputMetadata
from runtime.attention.params import AttentionParams
from runtime.attention.triton_config import FRESH_PROMPT_SDPA_MIN_TOKENS

log = logging.getLogger(__name__)

# Devices whose SDPA has cuDNN attention (the CPU tests add "cpu", SDPA's math backend
# standing in).
DEVICE_TYPES = ("cuda",)

# (dtype, head_dim, Hq, Hkv) that cuDNN refused once.
_REFUSED: set[tuple] = set()


def sdpa_can_attend(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,
    params: AttentionParams,
    sinks: torch.Tensor | None,
) -> bool:
    """Whether fresh prompts of this layer may go to cuDNN: causal attention with the
    source's scale (a sliding window or attention chunk is checked per prompt), keys and values of one head
    size, a 16-bit dtype on CUDA."""
    return (
        query.device.type in DEVICE_TYPES
        and query.dtype in (torch.float16, torch.bfloat16)
        and kv_cache.shape[0] == 2  # keys and values of one head size
        and params.alibi is None
        and params.logits_soft_cap is None
        and sinks is None
        and _key(query, kv_cache) not in _REFUSED
    )


def fresh_prompts(
    prefill_ids: list[int],
    query_lens: list[int],
    seq_lens: list[int],
    min_tokens: int,
    window: int | None = None,
    chunk: int | None = None,
) -> list[int]:
    """The sequences of `prefill_ids` whose every token is new, with >= `min_tokens`
    (and no more than `window` or `chunk`: a sliding window that long masks nothing, and
    a fresh prompt that short lies in its first attention chunk)."""
    longest = min(n for n in (window, chunk, max(seq_lens, default=0)) if n is not None)
    return [
        b
        for b in prefill_ids
        if query_lens[b] == seq_lens[b] and min_tokens <= query_lens[b] <= longest
    ]


def attend_fresh_prompts(
    out: torch.Tensor,  # [T, Hq, D], written at the handled prompts' rows
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], this step's K/V stored
    metadata: InputMetadata,
    params: AttentionParams,
    sinks: torch.Tensor | None,
    prefill_ids: list[int],
    min_tokens: int | None = None,
) -> list[int]:
    """Attend the fresh prompts among `prefill_ids` with cuDNN; returns the ids left for
    the paged prefill kernel (all of them where cuDNN does not apply)."""
    min_tokens = FRESH_PROMPT_SDPA_MIN_TOKENS if min_tokens is None else min_tokens
    query_lens = metadata.host_query_lens()
    longest = max(query_lens[b] for b in prefill_ids)
    if longest < min_tokens or not sdpa_can_attend(query, kv_cache, params, sinks):
        return prefill_ids
    seq_lens = metadata.host_seq_lens()
    fresh = fresh_prompts(
        prefill_ids, query_lens, seq_lens, min_tokens,
        params.sliding_window, params.attention_chunk_size,
    )  # fmt: skip
    if not fresh:
        return prefill_ids
    starts = [0, *accumulate(query_lens)]
    key_cache, value_cache = split_kv_cache(kv_cache, query.shape[2])
    block_size = kv_cache.shape[2]
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for b in fresh:
                start, length = starts[b], query_lens[b]
                blocks = metadata.block_tables[b, : -(-length // block_size)].long()
                k = key_cache[blocks].flatten(0, 1)[:length]  # [L, Hkv, D]
                v = value_cache[blocks].flatten(0, 1)[:length]  # [L, Hkv, D]
                o = F.scaled_dot_product_attention(
                    query[start : start + length].transpose(0, 1)[None],  # [1, Hq, L, D]
                    k.transpose(0, 1)[None],
                    v.transpose(0, 1)[None],
                    is_causal=True,
                    scale=params.scale,
                    enable_gqa=True,
                )  # [1, Hq, L, D]
                out[start : start + length] = o[0].transpose(0, 1)
    except RuntimeError as exc:  # cuDNN refuses this configuration: the kernel takes it
        _REFUSED.add(_key(query, kv_cache))
        log.warning("cuDNN attention refused fresh prompts (%s); using the Triton kernel", exc)
        return prefill_ids
    handled = set(fresh)
    return [b for b in prefill_ids if b not in handled]


def _key(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple:
    return (query.dtype, query.shape[2], query.shape[1], kv_cache.shape[3])
