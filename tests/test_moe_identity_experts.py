"""FusedMoE's zero-computation experts (``identity_experts``) against transformers' own
LongCat-Flash experts module, whose ids past the routed experts return their input.

transformers allocates ``gate_up_proj`` over every id, routed and zero (``[E + Z, 2I,
H]``, the zero experts' rows unused) and ``down_proj`` over the routed ones: both load
(fused, or one expert at a time), the zero experts' rows going nowhere; a row past them, or
a down projection for a zero expert, is refused. At TP=2 and EP=2 over gloo the ranks'
outputs sum to the same (the identity term is added once).
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed

from runtime.moe import FusedMoE
from runtime.parallel import ModuleListShard

transformers = pytest.importorskip("transformers")
from transformers.models.longcat_flash import modeling_longcat_flash as hf  # noqa: E402

E, Z, H, I, TOP_K = 6, 3, 16, 8, 3  # noqa: E741


def hf_experts(seed: int = 0) -> torch.nn.Module:
    config = transformers.LongcatFlashConfig(
        hidden_size=H, n_routed_experts=E, zero_expert_num=Z, expert_ffn_hidden_size=I
    )
    experts = hf.LongcatFlashExperts(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return experts


def fused(experts: torch.nn.Module, **kwargs) -> FusedMoE:
    layer = FusedMoE(E, H, I, activation="silu", identity_experts=Z, **kwargs)
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(layer, name)
        param.weight_loader(param, getattr(experts, name).detach())
    return layer


def routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids over routed and zero experts (token 0: zero experts only)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E + Z, generator=gen)[:TOP_K] for _ in range(num_tokens)])
    index[0] = torch.arange(E, E + TOP_K)
    return index, torch.rand(num_tokens, TOP_K, generator=gen)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_zero_experts(backend, monkeypatch):
    monkeypatch.setenv("HF2PAGED_MOE_BACKEND", backend)
    experts = hf_experts()
    assert experts.gate_up_proj.shape[0] == E + Z  # the zero experts' rows, unused
    layer = fused(experts)
    x = torch.randn(17, H, generator=torch.Generator().manual_seed(1))
    index, weights = routing(17, seed=2)
    with torch.no_grad():
        ref = experts(x, index, weights)
    out = layer(x, index, weights)
    assert (out - ref).abs().max().item() < 2e-5
    assert torch.allclose(out[0], x[0] * weights[0].sum(), atol=1e-6)  # zero experts only
    # sensitivity: without the zero experts' term the output misses
    layer.identity_experts = 0
    dropped = layer(x, index.masked_fill(index >= E, 0), weights.masked_fill(index >= E, 0))
    assert (dropped - ref).abs().max().item() > 1e-2


def test_per_expert_pieces_load_like_the_fused_tensor():
    experts = hf_experts(seed=3)
    layer = FusedMoE(E, H, I, activation="silu", identity_experts=Z)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    for e in range(E + Z):  # every id's gate/up rows, as a per-expert checkpoint has them
        for part, piece in enumerate(gate_up[e].chunk(2, dim=0)):
            layer.gate_up_proj.weight_loader(
                layer.gate_up_proj, piece, ModuleListShard(e, part, 2, 0, 1)
            )
    for e in range(E):
        layer.down_proj.weight_loader(layer.down_proj, down[e], ModuleListShard(e, 0, 1, 0, None))
    assert torch.equal(layer.gate_up_proj, fused(experts).gate_up_proj)
    with pytest.raises(ValueError, match=f"expert tensor {E + Z} stacked along dim 0"):
        layer.gate_up_proj.weight_loader(
            layer.gate_up_proj, gate_up[0][:I], ModuleListShard(E + Z, 0, 2, 0, 1)
        )
    with pytest.raises(ValueError, match=f"expert tensor {E} stacked along dim 0"):
        layer.down_proj.weight_loader(layer.down_proj, down[0], ModuleListShard(E, 0, 1, 0, None))


def _parallel(rank: int, world_size: int) -> list[tuple[str, float]]:
    experts = hf_experts(seed=4)
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(5))
    index, weights = routing(13, seed=6)
    with torch.no_grad():
        ref = experts(x, index, weights)
    results = []
    for mode, expert_parallel in (("tp", False), ("ep", True)):
        layer = fused(experts, expert_parallel=expert_parallel)
        for backend in ("torch", "triton"):
            os.environ["HF2PAGED_MOE_BACKEND"] = backend
            results.append(
                (f"{mode} {backend}", (layer(x, index, weights) - ref).abs().max().item())
            )
    return results


def test_tp2_and_ep2_add_the_zero_experts_once():
    for results in run_distributed(_parallel, 2):
        for tag, err in results:
            assert err <= 2e-5, f"{tag}: {err}"
