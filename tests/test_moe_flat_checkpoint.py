"""FusedMoE loading experts stored as 2-D tensors, every expert's weight of one projection
stacked along dim 0 (DBRX's ``w1 / v1 / w2 [E * I, H]``), through `FlatExperts` shard ids
in a stacked-params table: the same parameters as the fused 3-D checkpoint, in either
orientation of each tensor; a missing tensor or a wrong shape is named in one line.
(TP / EP shares: test_moe_parallel.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import HFWeights, Spec
from test_moe_checkpoint import Block, fused_checkpoint, load

from runtime.checkpoint import load_checkpoint
from runtime.moe import FlatExperts


def flat_checkpoint(
    weights: HFWeights, transposed: tuple[bool, bool, bool]
) -> tuple[dict[str, torch.Tensor], list]:
    """The experts as 2-D tensors ``wg`` (gate), ``wu`` (up), ``wd`` (down), each
    ``[E * out, in]`` or, transposed, ``[E * in, out]``; and the stacked table mapping
    them. Gate/up concatenated, no biases (the layouts such loops hold)."""
    spec = weights.spec
    per_expert = weights.per_expert()  # (projection, expert) -> [out, in]
    names = ["gate", "up", "down"] if spec.has_gate else ["up", "down"]
    flags = dict(zip(["gate", "up", "down"], transposed))
    ckpt, table = {}, []
    for kind in names:
        rows = [per_expert[kind, e] for e in range(spec.num_experts)]
        if flags[kind]:
            rows = [r.t() for r in rows]
        key = f"w{kind[0]}"
        ckpt[f"root.block.experts.{key}"] = torch.cat(rows, dim=0).contiguous()
        if kind == "down":
            target, part, parts = "down_proj", 0, 1
        else:
            target = spec.in_name
            part, parts = (("gate", "up").index(kind), 2) if spec.has_gate else (0, 1)
        shard = FlatExperts(part, parts, transposed=flags[kind])
        table.append((f".experts.{target}", f".experts.{key}", shard))
    return ckpt, table


def load_flat(model, ckpt: dict, table: list) -> set[str]:
    return load_checkpoint(
        model, list(ckpt.items()), renames=[(r"^root\.", "")], stacked_params_mapping=table
    )


@settings(max_examples=30, deadline=None)
@given(
    num_experts=st.integers(1, 12),
    inter=st.sampled_from([4, 8, 12]),
    has_gate=st.booleans(),
    transposed=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 1000),
)
def test_flat_tensors_load_as_the_fused_checkpoint(num_experts, inter, has_gate, transposed, seed):
    spec = Spec(
        num_experts, 16, inter, has_gate=has_gate, activation="silu" if has_gate else "gelu"
    )
    weights = HFWeights.random(spec, torch.float32, seed)
    from_fused, from_flat = Block(spec), Block(spec)
    names = load(from_fused, fused_checkpoint(weights), spec)
    ckpt, table = flat_checkpoint(weights, transposed)
    assert load_flat(from_flat, ckpt, table) == names
    for (name, a), (_, b) in zip(from_fused.named_parameters(), from_flat.named_parameters()):
        assert torch.equal(a, b), name


def test_a_missing_tensor_is_named():
    spec = Spec(4, 8, 6)
    ckpt, table = flat_checkpoint(HFWeights.random(spec, torch.float32), (False, False, True))
    del ckpt["root.block.experts.wu"]
    with pytest.raises(ValueError) as error:
        load_flat(Block(spec), ckpt, table)
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith(
        "1 parameter(s) not loaded ['block.experts.gate_up_proj (no block.experts.wu)']"
    )


def test_a_tensor_of_the_wrong_shape_is_named():
    spec = Spec(4, 8, 6)
    ckpt, table = flat_checkpoint(HFWeights.random(spec, torch.float32), (False, False, True))
    # down stored [E * H, I] where the table says transposed ([E * I, H])
    ckpt["root.block.experts.wd"] = torch.randn(4 * 8, 6)
    with pytest.raises(
        ValueError,
        match=r"block.experts.down_proj \(checkpoint root.block.experts.wd\): checkpoint "
        r"tensor has shape \(32, 6\), expected \(24, 8\)",
    ):
        load_flat(Block(spec), ckpt, table)


def test_flat_shards_where_they_do_not_fit_are_refused():
    layer = Spec(4, 8, 6).layer()
    down, gate_up = layer.down_proj, layer.gate_up_proj
    with pytest.raises(ValueError, match="down_proj is not concatenated from parts"):
        down.weight_loader(down, torch.randn(24, 8), FlatExperts(0, 2))
    with pytest.raises(ValueError, match="12 features have no part 2 of 2"):
        gate_up.weight_loader(gate_up, torch.randn(24, 8), FlatExperts(2, 2))
