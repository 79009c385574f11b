"""FusedMoE at TP=2 and EP=2 over gloo against the single-process layer: each rank loads
only its share (per-expert, fused and, without biases, 2-D flat checkpoints), and the ranks' outputs, summed by the
layer's all-reduce, equal the unsharded output (torch backend and Triton interpreter)."""

from __future__ import annotations

import os

import torch
from distributed import run_distributed
from moe_cases import HFWeights, Spec, routing
from test_moe_checkpoint import Block, fused_checkpoint, load, per_expert_checkpoint
from test_moe_flat_checkpoint import flat_checkpoint, load_flat

SPECS = [
    # gpt-oss: interleaved, transposed, biases (the down bias added once under TP)
    Spec(4, 16, 8, is_concatenated=False, is_transposed=True, has_bias=True,
         alpha=1.702, limit=0.7, up_offset=1.0),
    Spec(5, 16, 8, has_bias=True, activation="gelu"),  # 5 experts: uneven EP split 3 / 2
    Spec(4, 16, 8, has_gate=False, activation="relu2"),
    Spec(6, 16, 8, apply_router_weight_on_input=True),
]  # fmt: skip


def held_share(layer, weights: HFWeights) -> list[torch.Tensor]:
    """What this rank must hold, cut from transformers' layout directly."""
    spec, p = weights.spec, layer.partition
    w_in, w_down = weights.tensors[spec.in_name], weights.tensors["down_proj"]
    if spec.is_transposed:
        w_in, w_down = w_in.transpose(1, 2), w_down.transpose(1, 2)
    experts = slice(p.expert_start, p.expert_start + p.num_local_experts)
    cols = slice(p.intermediate_start, p.intermediate_start + p.local_intermediate_size)
    if spec.has_gate:
        gate, up = w_in.chunk(2, dim=1) if spec.is_concatenated else (w_in[:, ::2], w_in[:, 1::2])
        w_in = torch.cat([gate[experts, cols], up[experts, cols]], dim=1)
    else:
        w_in = w_in[experts, cols]
    return [w_in, w_down[experts, :, cols]]


def _check(rank: int, world_size: int) -> list[tuple[str, float]]:
    results = []
    for i, spec in enumerate(SPECS):
        weights = HFWeights.random(spec, torch.float32, seed=i)
        index, route_w = routing(21, spec.num_experts, 2, seed=i, busy_experts=3)
        x = torch.randn(21, spec.hidden, generator=torch.Generator().manual_seed(i))
        full = weights.oracle(x, index, route_w)  # the unsharded layer's function
        for mode, expert_parallel in (("tp", False), ("ep", True)):
            from_pieces = Block(spec, expert_parallel=expert_parallel)
            load(from_pieces, per_expert_checkpoint(weights), spec)
            from_fused = Block(spec, expert_parallel=expert_parallel)
            load(from_fused, fused_checkpoint(weights), spec)
            layer = from_pieces.block.experts
            tag = f"{mode} spec{i}"
            share = held_share(layer, weights)
            held = [getattr(layer, spec.in_name), layer.down_proj]
            results.append(
                (f"{tag} held", max((a - b).abs().max().item() for a, b in zip(held, share)))
            )
            same = max(
                (a - b).abs().max().item()
                for a, b in zip(from_pieces.parameters(), from_fused.parameters())
            )
            results.append((f"{tag} pieces=fused", same))
            if not spec.has_bias and spec.is_concatenated:  # 2-D tensors (DBRX): same share
                from_flat = Block(spec, expert_parallel=expert_parallel)
                load_flat(from_flat, *flat_checkpoint(weights, (i % 2 == 0, False, i % 2 == 1)))
                same = max(
                    (a - b).abs().max().item()
                    for a, b in zip(from_pieces.parameters(), from_flat.parameters())
                )
                results.append((f"{tag} pieces=flat", same))
            for backend in ("torch", "triton"):
                os.environ["HF2PAGED_MOE_BACKEND"] = backend
                out = layer(x, index, route_w)
                results.append((f"{tag} {backend} output", (out - full).abs().max().item()))
            # sensitivity: a rank's partial sum (no all-reduce) is far from the output
            layer.reduce_results = False
            partial = (layer(x, index, route_w) - full).abs().max().item()
            results.append((f"{tag} partial sum misses", -partial))
    return results


def test_tp2_and_ep2_match_the_single_process_layer():
    for results in run_distributed(_check, 2):
        for tag, err in results:
            if tag.endswith("misses"):
                assert -err > 1e-2, f"{tag}: only {-err}"
            else:
                bound = 0.0 if tag.endswith(("held", "pieces=fused", "pieces=flat")) else 2e-5
                assert err <= bound, f"{tag}: {err}"
