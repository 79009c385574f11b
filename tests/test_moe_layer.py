"""FusedMoE's torch backend against a plain per-expert loop over transformers' layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import DTYPES, HFWeights, Spec, assert_matches, routing, specs

from runtime.moe import FusedMoE


@settings(max_examples=60, deadline=None)
@given(
    spec=specs(),
    num_tokens=st.integers(1, 512),
    top_k=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    idle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_matches_the_per_expert_loop(spec, num_tokens, top_k, dtype, idle, seed):
    top_k = min(top_k, spec.num_experts)
    weights = HFWeights.random(spec, dtype, seed)
    layer = spec.layer(dtype)
    weights.load_into(layer)
    busy = max(1, spec.num_experts // 3) if idle else None  # most experts receive no token
    index, route_w = routing(num_tokens, spec.num_experts, top_k, seed, busy)
    x = torch.randn(num_tokens, spec.hidden, generator=torch.Generator().manual_seed(seed))
    out = layer(x.to(dtype), index, route_w)
    assert out.dtype == dtype
    assert_matches(out, weights.oracle(x.to(dtype), index, route_w), dtype)


def test_sensitivity_every_layout_flag_matters():
    """Loading a layout with a flag flipped gives a different function: the oracle check
    above would catch a flag the layer ignored."""
    base = Spec(8, 16, 8, has_bias=True, alpha=1.702, limit=0.5, up_offset=1.0)
    index, route_w = routing(32, 8, 2, seed=1)
    x = torch.randn(32, 16)
    weights = HFWeights.random(base, torch.float32)
    ref = weights.oracle(x, index, route_w)
    for flag in ("is_concatenated", "up_offset", "limit", "apply_router_weight_on_input"):
        other = Spec(**{**base.__dict__})
        setattr(other, flag, {"up_offset": 0.0, "limit": None}.get(flag, not getattr(base, flag)))
        layer = other.layer()
        weights.load_into(layer)  # same tensors, read under another flag
        err = (layer(x, index, route_w) - ref).abs().max().item()
        assert err > 1e-3, f"{flag} made no difference"


def test_leading_dims_come_back():
    """[1, T, H] in (an experts loop that flattens its input and restores it, DBRX):
    the [T, H] result in that shape."""
    spec = Spec(4, 8, 4)
    layer = spec.layer()
    HFWeights.random(spec, torch.float32).load_into(layer)
    x = torch.randn(5, 8)
    index = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0], [2, 2]])
    weights = torch.rand(5, 2)
    flat = layer(x, index, weights)
    assert torch.equal(layer(x[None], index, weights), flat[None])


def test_zero_tokens_and_empty_routing():
    layer = Spec(4, 8, 4).layer()
    HFWeights.random(Spec(4, 8, 4), torch.float32).load_into(layer)
    out = layer(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 8)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="expert activation 'xielu' is not supported"):
        FusedMoE(4, 8, 4, activation="xielu")
    layer = FusedMoE(4, 8, 4)
    with pytest.raises(ValueError, match=r"takes hidden_states \[T, 8\]"):
        layer(torch.randn(3, 6), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"got 3 tokens but top_k_index \(1, 3, 1\)"):
        layer(torch.randn(1, 3, 8), torch.zeros(1, 3, 1, dtype=torch.long), torch.ones(1, 3, 1))
    with pytest.raises(ValueError, match="HF2PAGED_MOE_BACKEND='cuda'"):
        import os

        os.environ["HF2PAGED_MOE_BACKEND"] = "cuda"
        try:
            layer(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
        finally:
            del os.environ["HF2PAGED_MOE_BACKEND"]


def test_extra_repr_names_the_layout():
    text = repr(FusedMoE(4, 8, 4, has_bias=True, activation="gelu"))
    assert "num_experts=4" in text and "activation=gelu" in text and "has_bias=True" in text
