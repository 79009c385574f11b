"""Torch reference backend: readable, slow, and the oracle every kernel is tested against."""

from __future__ import annotations

import torch

from runtime.attention.kv_layout import split_kv_cache
from runtime.attention.metadata import InputMetadata
from runtime.attention.params import AttentionParams


def reshape_and_cache_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, Dv]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W] (runtime.attention.kv_layout)
    slot_mapping: torch.Tensor,  # [T] int64, < 0 = skip
) -> None:
    """Store each token's K/V at its slot (``block * block_size + offset``)."""
    key_cache, value_cache = split_kv_cache(kv_cache, key.shape[-1])
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(kv_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(kv_cache.dtype)


def gather_sequence_kv(
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W]
    block_table: torch.Tensor,  # [max_blocks]
    seq_len: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` cached K ``[seq_len, Hkv, D]`` and V ``[seq_len, Hkv, Dv]`` of
    one sequence (keys of ``head_dim``)."""
    key_cache, value_cache = split_kv_cache(kv_cache, head_dim)
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = key_cache[blocks].flatten(0, 1)[:seq_len]
    v = value_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [S, num_blocks, block_size, Hkv, W], this step's K/V stored
    metadata: InputMetadata,
    params: AttentionParams,
    sinks: torch.Tensor | None = None,  # [Hq] fp32
) -> torch.Tensor:  # [T, Hq, Dv]
    """Causal attention of every new token over its sequence's cached context.

    Query ``i`` of a sequence with ``L`` context tokens and ``Q`` new tokens sits at
    position ``p = L - Q + i`` and sees keys ``j`` with ``p - W < j <= p`` (``W`` the
    sliding window, transformers' convention) and ``j >= (p // C) * C`` (``C`` the
    attention chunk size: keys of its own chunk only). Scores as `AttentionParams` states:
    ``q.k * scale``, then soft-capping ``tanh(s / c) * c``, then ALiBi
    ``slope_h * (j - p) * alibi.scale`` (built in bfloat16: ``bf16(bf16(slope_h) * bf16(j))
    * alibi.scale``, transformers' Falcon); softmax in fp32. ``sinks`` (attention sinks,
    gpt-oss's ``s_aux``) add ``exp(sinks[h])`` to each row's softmax denominator.
    """
    window, soft_cap, alibi = params.sliding_window, params.logits_soft_cap, params.alibi
    chunk = params.attention_chunk_size
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    v_head_dim = split_kv_cache(kv_cache, head_dim)[1].shape[-1]
    group = num_heads // num_kv_heads
    out = query.new_empty(query.shape[0], num_heads, v_head_dim)
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.host_seq_lens()
    for b, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        q = query[q_start:q_end].float().transpose(0, 1)  # [Hq, Q, D]
        k, v = gather_sequence_kv(kv_cache, metadata.block_tables[b], seq_len, head_dim)
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, Dv]
        scores = torch.matmul(q, k.transpose(1, 2)) * params.scale  # [Hq, Q, L]
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        q_pos = torch.arange(seq_len - (q_end - q_start), seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        rel = k_pos[None, :] - q_pos[:, None]  # [Q, L]
        if alibi is not None and alibi.rounds_bf16:
            # bf16 tensor times positions, as Falcon's build_alibi_tensor: [Hq, 1, L]
            slopes = alibi.slopes.to(torch.bfloat16)[:, None, None]
            scores = scores + (slopes * k_pos.to(torch.bfloat16)).float() * alibi.scale
        elif alibi is not None:
            scores = scores + alibi.slopes[:, None, None] * rel[None] * alibi.scale
        visible = rel <= 0
        if window is not None:
            visible &= rel > -window
        if chunk is not None:
            visible &= k_pos[None, :] >= (q_pos[:, None] // chunk) * chunk
        scores = scores.masked_fill(~visible[None], float("-inf"))
        if sinks is not None:
            # one more logit per head in the denominator, attached to no value
            sink = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)  # [Hq, Q, 1]
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    assert out.shape == (query.shape[0], num_heads, v_head_dim)
    return out
