"""Chunk-local attention (``attention_chunk_size``, Llama 4's "chunked_attention" layers):
query ``i`` sees keys ``(i // C) * C <= j <= i``. The torch reference, the Triton kernels
(interpreter on CPU) and the compiled path's operator against a dense mask built as
transformers builds it (``chunked_overlay``: ``j // C == i // C``, and causal)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    DEVICE,
    assert_close,
    attention_kwargs,
    batches,
    dense_attention,
    make_batch,
    run_triton,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.attention import AttentionParams, PagedAttention
from runtime.attention.forward_context import step_metadata
from runtime.attention.opaque_op import opaque_attention
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref
from runtime.attention.triton_config import DecodeConfig, PrefillConfig
from runtime.engine.step_inputs import StepInputs

SMALL = dict(head_dims=(64,), v_head_dims=(None, 32))
CHUNKS = st.integers(1, 20)  # below, at and above the block sizes (1..32) drawn


def reference(batch):
    return paged_attention_ref(
        batch.query, batch.kv_cache, batch.metadata, **attention_kwargs(batch)
    )


@settings(max_examples=40, deadline=None)
@given(batch=batches(**SMALL, chunk_sizes=CHUNKS))
def test_reference_matches_dense_chunked_mask(batch):
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    assert_close(reference(batch), dense_attention(batch), batch.query.dtype)


@settings(max_examples=25, deadline=None)
@given(
    batch=batches(dtypes=(torch.float32, torch.bfloat16), **SMALL, chunk_sizes=CHUNKS),
    block_n=st.sampled_from([16, 32]),
    num_splits=st.sampled_from([None, 1, 3]),
    prefill=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
)
def test_triton_matches_dense_and_reference(batch, block_n, num_splits, prefill):
    out = run_triton(
        batch,
        num_splits=num_splits,
        decode_config=DecodeConfig(block_n=block_n),
        prefill_config=PrefillConfig(block_m=prefill[0], block_n=prefill[1], num_warps=4),
    )
    dtype = batch.query.dtype
    assert_close(out, dense_attention(batch), dtype)
    assert_close(out, reference(batch).float(), dtype)


def boundary_shapes(chunk: int) -> list[tuple[int, int]]:
    """(cached context, new tokens) around chunk boundaries."""
    return [
        (0, 2 * chunk + 3),  # a fresh prompt over three chunks
        (max(chunk - 2, 1), 5),  # a prefill chunk continuing across a boundary
        (chunk, 3),  # a prefill chunk starting on a boundary
        (2 * chunk, 1),  # decode of a chunk's first token: sees itself only
        (2 * chunk - 1, 1),  # decode of a chunk's last token: sees its whole chunk
        (3 * chunk + 1, 1),
    ]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk", [1, 3, 4, 8, 20])
def test_boundaries_mixed_and_decode_only(chunk, window):
    # block size 4: chunks of a block, below it, a multiple of it and not one; prefill
    # tiles of 16 keys/queries so long prompts take several tiles and skip whole ones
    shapes = boundary_shapes(chunk)
    common = dict(num_heads=4, num_kv_heads=2, head_dim=64, block_size=4,
                  dtype=torch.float32, attention_chunk_size=chunk, sliding_window=window)  # fmt: skip
    launch = dict(
        decode_config=DecodeConfig(block_n=16),
        prefill_config=PrefillConfig(block_m=16, block_n=16, num_warps=4),
    )
    batch = make_batch(shapes, **common)
    out = run_triton(batch, num_splits=2, **launch)
    assert_close(out, dense_attention(batch), torch.float32)
    assert_close(out, reference(batch), torch.float32)
    # decode-only: the graph-capturable path, more splits than the visible keys need
    decodes = make_batch([s for s in shapes if s[1] == 1], **common)
    decodes.metadata.query_lens_cpu = None  # any host-list read would now sync
    assert_close(run_triton(decodes, num_splits=4, **launch), dense_attention(decodes),
                 torch.float32)  # fmt: skip


def test_long_prompt_tiles_see_only_their_chunks():
    # Chunk 32 over 16-row tiles: tiles wholly inside a chunk read keys unmasked from
    # the chunk start; a chunk of 20 splits tiles between two chunks. Keys of an earlier
    # chunk are NaN here: any read of them that is not masked shows.
    for chunk in (32, 20):
        batch = make_batch([(0, 70), (37, 30)], num_heads=2, num_kv_heads=1, head_dim=64,
                           block_size=8, dtype=torch.float32, attention_chunk_size=chunk)  # fmt: skip
        out = run_triton(batch, prefill_config=PrefillConfig(block_m=16, block_n=16))
        assert_close(out, dense_attention(batch), torch.float32)


def test_chunked_mask_differs_from_causal():
    """The checks above can fail: the same batch without the chunk limit is far off."""
    batch = make_batch(boundary_shapes(4), num_heads=2, num_kv_heads=2, head_dim=64,
                       block_size=4, dtype=torch.float32, attention_chunk_size=4)  # fmt: skip
    expected = dense_attention(batch)
    batch.attention_chunk_size = None
    out = run_triton(batch)
    assert (out - expected).abs().max() > 0.1


def test_params_and_layer():
    assert AttentionParams(1.0, attention_chunk_size=0).attention_chunk_size is None
    assert AttentionParams(1.0, attention_chunk_size=-1).attention_chunk_size is None
    assert AttentionParams(1.0, attention_chunk_size=8192.0).attention_chunk_size == 8192
    # positional arguments keep their meaning: (scale, window, soft cap, alibi)
    assert AttentionParams(1.0, 4, 30.0).logits_soft_cap == 30.0
    layer = PagedAttention(2, 64, 0.125, attention_chunk_size=8)
    assert layer.params.attention_chunk_size == 8 and "attention_chunk_size=8" in repr(layer)
    layer.attention_chunk_size = None
    assert layer.params.attention_chunk_size is None and layer.params.scale == 0.125


def test_module_steps_across_boundaries(monkeypatch):
    """Prompt, a chunk, then decodes across chunk boundaries through `PagedAttention`:
    eager on both backends and the compiled path's operator agree with dense."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size, chunk = 4, 2, 64, 4, 6
    layer = PagedAttention(heads, head_dim, scale=0.125, num_kv_heads=kv_heads,
                           attention_chunk_size=chunk).to(DEVICE)  # fmt: skip
    caches = {
        name: torch.zeros(2, 10, block_size, kv_heads, head_dim, device=DEVICE)
        for name in ("torch", "triton", "op")
    }
    tables = [[3, 0, 6, 8], [5, 1, 7, 9]]
    steps = [([0, 0], [7, 3]), ([7, 3], [5, 4]), ([12, 7], [1, 1]), ([13, 8], [1, 1])]
    for context, new in steps:
        metadata = StepInputs.build(tables, context, new, block_size).to_device(DEVICE).metadata
        q = torch.randn(sum(new), heads * head_dim, device=DEVICE)  # [T, Hq*D]
        k = torch.randn(sum(new), kv_heads * head_dim, device=DEVICE)  # [T, Hkv*D]
        v = torch.randn(sum(new), kv_heads * head_dim, device=DEVICE)  # [T, Hkv*D]
        outs = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", backend)
            outs[backend] = layer(q, k, v, caches[backend], metadata)  # [T, Hq*D]
        with step_metadata(metadata):
            outs["op"] = opaque_attention(
                q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim),
                v.view(-1, kv_heads, head_dim), caches["op"], layer.params, None,
            ).flatten(1)  # fmt: skip
        for name in ("triton", "op"):
            torch.testing.assert_close(outs[name], outs["torch"], atol=1e-4, rtol=0)
    # the last decode (position 13 of sequence 0) sees its chunk [12, 13] only
    cached = caches["torch"]
    positions = [tables[0][p // block_size] * block_size + p % block_size for p in (12, 13)]
    key = cached[0].flatten(0, 1)[positions].float()  # [2, Hkv, D]
    value = cached[1].flatten(0, 1)[positions].float()
    query = q[0].view(heads, head_dim).float()
    group = heads // kv_heads
    scores = torch.einsum("hd,nhd->hn", query, key.repeat_interleave(group, 1)) * 0.125
    expected = torch.einsum("hn,nhd->hd", scores.softmax(-1), value.repeat_interleave(group, 1))
    torch.testing.assert_close(outs["torch"][0].view(heads, head_dim), expected,
                               atol=1e-4, rtol=0)  # fmt: skip
