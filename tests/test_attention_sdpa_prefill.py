"""Fresh prompts through SDPA (runtime/attention/sdpa_prefill.py) beside the Triton
kernels (interpreter on CPU), against dense attention. On CPU, SDPA's math backend
stands in for cuDNN; the GPU run (benchmarks/attention.py) times the real one."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from attention_cases import assert_close, attention_kwargs, batches, dense_attention, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.attention.sdpa_prefill as sdpa_prefill
from runtime.attention.reference import reshape_and_cache_ref
from runtime.attention.sdpa_prefill import fresh_prompts
from runtime.attention.triton_ops import paged_attention

DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def sdpa_on_cpu(monkeypatch):
    """SDPA's default backend stands in for cuDNN; calls are counted."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])  # query length
        return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(sdpa_prefill, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(sdpa_prefill, "sdpa_kernel", lambda backend: contextlib.nullcontext())
    monkeypatch.setattr(sdpa_prefill, "F", SimpleNamespace(scaled_dot_product_attention=counted))
    monkeypatch.setattr(sdpa_prefill, "_REFUSED", set())
    return calls


def attend(batch, sdpa_min_tokens: int):
    reshape_and_cache_ref(batch.key, batch.value, batch.kv_cache, batch.metadata.slot_mapping)
    return paged_attention(
        batch.query, batch.kv_cache, batch.metadata, **attention_kwargs(batch),
        sdpa_min_tokens=sdpa_min_tokens,
    )  # fmt: skip


@settings(max_examples=20, deadline=None)
@given(batch=batches(dtypes=DTYPES, v_head_dims=(None,)), min_tokens=st.sampled_from([1, 4, 9]))
def test_mixed_batches_match_dense(batch, min_tokens):
    assert_close(attend(batch, min_tokens), dense_attention(batch), batch.query.dtype)


def test_fresh_prompts_go_to_sdpa_and_the_rest_to_the_kernels(sdpa_on_cpu):
    # fresh 9 and 3 tokens, a chunk after context, two decodes
    shapes = [(0, 9), (0, 3), (21, 5), (30, 1), (3, 1)]
    batch = make_batch(shapes, num_heads=4, num_kv_heads=2, head_dim=64, block_size=4,
                       dtype=torch.bfloat16)  # fmt: skip
    out = attend(batch, sdpa_min_tokens=4)
    assert sdpa_on_cpu == [9]  # the 3-token prompt is under the threshold, the chunk is no prompt
    assert_close(out, dense_attention(batch), torch.bfloat16)


def test_features_cudnn_lacks_stay_on_the_kernel(sdpa_on_cpu):
    for feature in (dict(alibi=True), dict(logits_soft_cap=5.0), dict(sinks=True)):
        batch = make_batch([(0, 9)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4,
                           dtype=torch.float16, **feature)  # fmt: skip
        assert_close(attend(batch, 1), dense_attention(batch), torch.float16)
    assert sdpa_on_cpu == []
    batch = make_batch([(0, 9), (0, 6)], num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=4, dtype=torch.float16, sliding_window=6)  # fmt: skip
    assert_close(attend(batch, 1), dense_attention(batch), torch.float16)
    assert sdpa_on_cpu == [6]  # a window as long as the prompt masks nothing


def test_prompts_longer_than_an_attention_chunk_stay_on_the_kernel(sdpa_on_cpu):
    # chunk 6: the 9-token prompt crosses a chunk boundary (plain causal SDPA would let
    # tokens 6..8 see 0..5); the 6-token prompt lies in its first chunk
    batch = make_batch([(0, 9), (0, 6), (0, 7)], num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=4, dtype=torch.bfloat16, attention_chunk_size=6)  # fmt: skip
    assert_close(attend(batch, 1), dense_attention(batch), torch.bfloat16)
    assert sdpa_on_cpu == [6]


def test_a_refused_configuration_is_not_asked_again(monkeypatch, sdpa_on_cpu):
    def refuse(*args, **kwargs):
        sdpa_on_cpu.append("refused")
        raise RuntimeError("No available kernel")

    monkeypatch.setattr(sdpa_prefill, "F", SimpleNamespace(scaled_dot_product_attention=refuse))
    for _ in range(2):
        batch = make_batch([(0, 9), (4, 1)], num_heads=4, num_kv_heads=2, head_dim=64,
                           block_size=4, dtype=torch.bfloat16)  # fmt: skip
        assert_close(attend(batch, 1), dense_attention(batch), torch.bfloat16)
    assert sdpa_on_cpu == ["refused"]


def test_fresh_prompts():
    prefill = [0, 1, 2, 3]
    query, seq = [9, 9, 3, 12], [9, 14, 3, 12]
    assert fresh_prompts(prefill, query, seq, 4) == [0, 3]  # 1 is a chunk, 2 too short
    assert fresh_prompts(prefill, query, seq, 4, window=10) == [0]
    assert fresh_prompts([1, 2], query, seq, 1) == [2]
    assert fresh_prompts(prefill, query, seq, 4, chunk=9) == [0]
    assert fresh_prompts(prefill, query, seq, 1, window=12, chunk=3) == [2]
