"""k/v handed to `PagedAttention` already repeated over each query group (``repeat_kv``;
Falcon's new decoder architecture broadcasts them before attention) are recognised by
their head count and cached one head per group: same output as the unrepeated call, a
cache of ``num_kv_heads``. Any other head count is refused with one clear line."""

from __future__ import annotations

import pytest
import torch
from attention_cases import assert_close, dense_attention, make_batch, to_device

from runtime.attention import PagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_repeated_kv_cached_once_per_group(monkeypatch, backend, num_kv_heads):
    monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", backend)
    # a prefill, a chunk over cached context and a decode in one batch
    batch = make_batch(
        [(0, 6), (5, 3), (9, 1)], num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
        block_size=4, dtype=torch.float32,
    )  # fmt: skip
    group = 4 // num_kv_heads
    layer = PagedAttention(4, 16, batch.scale, num_kv_heads=num_kv_heads)
    moved = to_device(batch, DEVICE)
    key = moved.key.repeat_interleave(group, dim=1)  # [T, Hq, D]: head h = kv head h // group
    value = moved.value.repeat_interleave(group, dim=1)
    out = layer.to(DEVICE)(
        moved.query.flatten(1), key.flatten(1), value.flatten(1), moved.kv_cache, moved.metadata
    )  # [T, Hq*D]
    assert_close(out.unflatten(1, (4, 16)), dense_attention(batch), torch.float32)
    assert moved.kv_cache.shape[-2] == num_kv_heads
    # the unrepeated call works on the same layer (Falcon's multi-query layout)
    plain = layer(
        moved.query.flatten(1), moved.key.flatten(1), moved.value.flatten(1),
        moved.kv_cache, moved.metadata,
    )  # fmt: skip
    assert_close(plain.unflatten(1, (4, 16)), dense_attention(batch), torch.float32)


@pytest.mark.parametrize("heads", [3, 8])
def test_other_head_counts_are_refused(heads):
    layer = PagedAttention(4, 16, 0.25, num_kv_heads=2)
    batch = make_batch([(0, 3)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                       dtype=torch.float32)  # fmt: skip
    key = torch.randn(3, heads * 16)
    message = rf"key \(3, {heads * 16}\) of 3 tokens: expected 2 kv heads"
    with pytest.raises(ValueError, match=message):
        layer(batch.query.flatten(1), key, key, batch.kv_cache, batch.metadata)
