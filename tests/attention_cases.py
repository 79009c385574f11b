"""Random paged-attention batches and a dense oracle on the unpaged sequences.

Shared by tests/test_attention_reference.py and tests/test_attention_triton.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from runtime.attention.kv_layout import kv_cache_shape, split_kv_cache
from runtime.attention.metadata import InputMetadata
from runtime.attention.params import Alibi, AttentionParams
from runtime.engine.step_inputs import StepInputs

# Interpreter on CPU (tests/conftest.py); the same tests run the compiled kernels on a GPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEAD_LAYOUTS = [(2, 2), (4, 2), (4, 1), (6, 2), (3, 3)]  # (Hq, Hkv): MHA, GQA, MQA, odd G
# (atol, rtol). bf16 probabilities are rounded to 8 bits before P @ V (the interpreter
# even truncates them), which biases outputs by up to ~1% of their size.
# attention_chunk_size: off, or 1..24 (below, at and above the block sizes drawn)
CHUNK_SIZES = st.one_of(st.none(), st.integers(1, 24))
TOLERANCE = {torch.float32: (1e-4, 0.0), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


@dataclass
class Batch:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D] this step's new keys
    value: torch.Tensor  # [T, Hkv, Dv]
    kv_cache: torch.Tensor  # [S, num_blocks, block_size, Hkv, W], context stored, rest NaN
    metadata: InputMetadata
    full_keys: list[torch.Tensor]  # per sequence [L, Hkv, D], context + new, unpaged
    full_values: list[torch.Tensor]  # per sequence [L, Hkv, Dv]
    scale: float
    sliding_window: int | None
    alibi_slopes: torch.Tensor | None  # [Hq] fp32
    logits_soft_cap: float | None
    sinks: torch.Tensor | None = None  # [Hq] fp32 attention-sink logits
    attention_chunk_size: int | None = None


@st.composite
def sequence_shapes(draw, max_context: int = 40, max_query: int = 12) -> tuple[int, int]:
    """(cached context, new tokens): a fresh prompt, a chunk after context, or a decode."""
    kind = draw(st.sampled_from(["prefill", "chunk", "decode"]))
    if kind == "prefill":
        return 0, draw(st.integers(1, max_query))
    if kind == "chunk":
        return draw(st.integers(1, max_context)), draw(st.integers(2, max_query))
    return draw(st.integers(0, max_context)), 1


@st.composite
def batches(
    draw,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    head_dims=(64, 80, 96, 128, 256),
    v_head_dims=(None, None, 32, 64, 128),  # None: the key's head size
    sinks=(False, True),
    chunk_sizes=CHUNK_SIZES,
):
    shapes = draw(st.lists(sequence_shapes(), min_size=1, max_size=4))
    num_heads, num_kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    return make_batch(
        shapes,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from(head_dims)),
        v_head_dim=draw(st.sampled_from(v_head_dims)),
        block_size=draw(st.sampled_from([1, 2, 4, 8, 16, 32])),
        dtype=draw(st.sampled_from(dtypes)),
        spare_blocks=draw(st.integers(0, 3)),
        pad_columns=draw(st.integers(0, 2)),
        block_order=draw(st.randoms(use_true_random=False)),
        seed=draw(st.integers(0, 2**16)),
        scale=draw(st.sampled_from([None, 0.3, 1.0])),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 24))),
        alibi=draw(st.booleans()),
        logits_soft_cap=draw(st.sampled_from([None, 2.0, 30.0])),
        sinks=draw(st.sampled_from(sinks)),
        attention_chunk_size=draw(chunk_sizes),
    )


def make_batch(
    shapes: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    v_head_dim: int | None = None,
    spare_blocks: int = 1,
    pad_columns: int = 1,
    block_order=None,
    seed: int = 0,
    scale: float | None = None,
    sliding_window: int | None = None,
    alibi: bool = False,
    logits_soft_cap: float | None = None,
    sinks: bool = False,
    attention_chunk_size: int | None = None,
) -> Batch:
    """Sequences ``(context, new)`` on shuffled blocks; context K/V already cached,
    unused cache slots NaN (so any unmasked read shows), unused table entries -1."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-(ctx + new) // block_size) for ctx, new in shapes]
    ids = list(range(sum(needed) + spare_blocks))
    if block_order is not None:
        block_order.shuffle(ids)
    tables, start = [], 0
    for n in needed:
        tables.append(ids[start : start + n])
        start += n
    step = StepInputs.build(tables, [c for c, _ in shapes], [q for _, q in shapes], block_size)
    metadata = step.to_device().metadata
    # Extra -1 columns: kernels must never follow an entry past a sequence's end.
    metadata.block_tables = torch.cat(
        [metadata.block_tables, torch.full((len(shapes), pad_columns), -1, dtype=torch.int32)], 1
    )  # [B, max_blocks + pad_columns]
    v_head_dim = v_head_dim or head_dim
    shape = kv_cache_shape(len(ids), block_size, num_kv_heads, head_dim, v_head_dim)
    kv_cache = torch.full(shape, float("nan"), dtype=dtype)  # [S, num_blocks, block_size, Hkv, W]
    key_cache, value_cache = split_kv_cache(kv_cache, head_dim)
    full_keys, full_values, new_k, new_v = [], [], [], []
    for (ctx, new), table in zip(shapes, tables):
        k = torch.randn(ctx + new, num_kv_heads, head_dim, generator=gen).to(dtype)  # [L, Hkv, D]
        v = torch.randn(ctx + new, num_kv_heads, v_head_dim, generator=gen).to(
            dtype
        )  # [L, Hkv, Dv]
        for pos in range(ctx):
            key_cache[table[pos // block_size], pos % block_size] = k[pos]
            value_cache[table[pos // block_size], pos % block_size] = v[pos]
        full_keys.append(k)
        full_values.append(v)
        new_k.append(k[ctx:])
        new_v.append(v[ctx:])
    num_tokens = sum(q for _, q in shapes)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)  # [T, Hq, D]
    slopes = None
    if alibi:
        slopes = torch.rand(num_heads, generator=gen) * 0.5  # [Hq] fp32
    return Batch(
        query=query,
        key=torch.cat(new_k),
        value=torch.cat(new_v),
        kv_cache=kv_cache,
        metadata=metadata,
        full_keys=full_keys,
        full_values=full_values,
        scale=head_dim**-0.5 if scale is None else scale,
        sliding_window=sliding_window,
        alibi_slopes=slopes,
        logits_soft_cap=logits_soft_cap,
        # logits around the scores' range, so the sink takes a real share of each row
        sinks=torch.randn(num_heads, generator=gen) * 2.0 if sinks else None,
        attention_chunk_size=attention_chunk_size,
    )


def dense_attention(batch: Batch) -> torch.Tensor:  # [T, Hq, Dv] fp32
    """The expected output, from the unpaged sequences: SDPA with an explicit boolean
    mask, or a masked softmax written out when ALiBi / soft-capping / sinks modify the
    scores."""
    outs = []
    starts = batch.metadata.query_start_loc.tolist()
    for b, (k, v) in enumerate(zip(batch.full_keys, batch.full_values)):
        q = batch.query[starts[b] : starts[b + 1]].float()  # [Q, Hq, D]
        num_q, num_heads = q.shape[0], q.shape[1]
        group = num_heads // k.shape[1]
        kk = k.float().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        vv = v.float().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, Dv]
        qq = q.transpose(0, 1)  # [Hq, Q, D]
        length = k.shape[0]
        q_pos = torch.arange(length - num_q, length)[:, None]  # [Q, 1]
        k_pos = torch.arange(length)[None, :]  # [1, L]
        visible = k_pos <= q_pos  # [Q, L]
        if batch.sliding_window is not None:
            visible &= k_pos > q_pos - batch.sliding_window
        if batch.attention_chunk_size is not None:  # transformers' chunked_overlay
            visible &= k_pos // batch.attention_chunk_size == q_pos // batch.attention_chunk_size
        if batch.alibi_slopes is None and batch.logits_soft_cap is None and batch.sinks is None:
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=visible, scale=batch.scale)
        else:
            s = qq @ kk.transpose(1, 2) * batch.scale  # [Hq, Q, L]
            if batch.logits_soft_cap is not None:
                s = torch.tanh(s / batch.logits_soft_cap) * batch.logits_soft_cap
            if batch.alibi_slopes is not None:
                s = s + batch.alibi_slopes[:, None, None] * (k_pos - q_pos)[None]
            s = s.masked_fill(~visible, float("-inf"))
            if batch.sinks is not None:  # exp(sink) joins each row's denominator
                s = torch.cat([s, batch.sinks[:, None, None].expand(-1, num_q, 1)], -1)
                vv = torch.cat([vv, vv.new_zeros(num_heads, 1, vv.shape[-1])], 1)
            o = torch.softmax(s, -1) @ vv  # [Hq, Q, Dv]
        outs.append(o.transpose(0, 1))  # [Q, Hq, Dv]
    return torch.cat(outs)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The same batch on ``device`` (the dense oracle keeps using the CPU copies)."""
    metadata = dataclasses.replace(batch.metadata, **tensor_fields(batch.metadata, device))
    return dataclasses.replace(batch, metadata=metadata, **tensor_fields(batch, device))


def tensor_fields(obj, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor field of the dataclass `obj`, on `device` (metadata included the ids
    of a mixed batch's decodes and prefills once something has made them)."""
    fields = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return {name: value.to(device) for name, value in fields if isinstance(value, torch.Tensor)}


def run_triton(batch: Batch, **launch) -> torch.Tensor:  # [T, Hq, Dv] on DEVICE
    """Store the batch's new K/V and attend with the Triton backend on DEVICE (``launch``:
    `triton_ops.paged_attention`'s overrides); the filled cache goes back into ``batch``
    (CPU) for the reference."""
    from runtime.attention.triton_ops import paged_attention, reshape_and_cache

    moved = to_device(batch, DEVICE)
    reshape_and_cache(moved.key, moved.value, moved.kv_cache, moved.metadata.slot_mapping)
    out = paged_attention(
        moved.query, moved.kv_cache, moved.metadata, **attention_kwargs(moved), **launch
    )
    batch.kv_cache = moved.kv_cache.cpu()
    return out


def attention_kwargs(batch: Batch) -> dict:
    """``params`` and ``sinks`` of either backend's attention call."""
    alibi = None if batch.alibi_slopes is None else Alibi(batch.alibi_slopes)
    params = AttentionParams(
        batch.scale, batch.sliding_window, batch.logits_soft_cap, alibi,
        attention_chunk_size=batch.attention_chunk_size,
    )  # fmt: skip
    return dict(params=params, sinks=batch.sinks)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    actual = actual.cpu()
    assert not torch.isnan(actual).any(), "NaN in output: a read outside the sequence's slots"
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
