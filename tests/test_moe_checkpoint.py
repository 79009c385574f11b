"""Loading FusedMoE strictly through runtime.checkpoint: the fused 3-D tensors and one
tensor per expert (transformers' MergeModulelist + Concatenate chain) in every layout,
and the errors that name what is missing. (TP / EP shards: test_moe_parallel.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import HFWeights, Spec, specs
from torch import nn

from runtime.checkpoint import load_checkpoint


class Block(nn.Module):
    """A model's view of the layer: parameters under ``block.experts.*``."""

    def __init__(self, spec: Spec, **kwargs):
        super().__init__()
        self.block = nn.Module()
        self.block.experts = spec.layer(**kwargs)


def converters(spec: Spec) -> list:
    """Per-expert checkpoint names (a, b: gate and up; c: down) merged as transformers
    does; odd names on purpose."""
    feature = 2 if spec.is_transposed else 1  # gate/up features of the stacked parameter
    merge = (("merge_modulelist", 0),)
    table = []
    for kind in ("weight", "bias"):
        if kind == "bias" and not spec.has_bias:
            continue
        suffix = "" if kind == "weight" else "_bias"
        if spec.has_gate:
            table.append((
                merge + (("concatenate", 1 if kind == "bias" else feature),),
                [rf"experts\.(\d+)\.a\.{kind}", rf"experts\.(\d+)\.b\.{kind}"],
                [f"experts.gate_up_proj{suffix}"],
            ))  # fmt: skip
        else:
            table.append((merge, [rf"experts\.(\d+)\.b\.{kind}"], [f"experts.up_proj{suffix}"]))
        table.append((merge, [rf"experts\.(\d+)\.c\.{kind}"], [f"experts.down_proj{suffix}"]))
    return table


def per_expert_checkpoint(weights: HFWeights) -> dict[str, torch.Tensor]:
    """What transformers' reverse ops would save: each expert's slice of every stacked
    tensor, gate/up cut in two along their feature dim (whatever the layout holds there)."""
    spec, ckpt = weights.spec, {}
    feature = 2 if spec.is_transposed else 1
    for name, full in weights.tensors.items():
        is_bias, is_down = name.endswith("_bias"), name.startswith("down")
        kind = "bias" if is_bias else "weight"
        for e in range(spec.num_experts):
            if is_down:
                ckpt[f"root.block.experts.{e}.c.{kind}"] = full[e].clone()
            elif spec.has_gate:
                a, b = full[e].chunk(2, dim=0 if is_bias else feature - 1)
                ckpt[f"root.block.experts.{e}.a.{kind}"] = a.clone()
                ckpt[f"root.block.experts.{e}.b.{kind}"] = b.clone()
            else:
                ckpt[f"root.block.experts.{e}.b.{kind}"] = full[e].clone()
    return ckpt


def fused_checkpoint(weights: HFWeights) -> dict[str, torch.Tensor]:
    return {f"root.block.experts.{k}": v for k, v in weights.tensors.items()}


def load(model: nn.Module, ckpt: dict, spec: Spec) -> set[str]:
    return load_checkpoint(
        model, list(ckpt.items()), renames=[(r"^root\.", "")], stacked_params_mapping=[],
        prefix="", ignored=[], tied=set(), converters=converters(spec),
    )  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(spec=specs(max_experts=12), seed=st.integers(0, 1000))
def test_per_expert_and_fused_checkpoints_load_the_same(spec, seed):
    weights = HFWeights.random(spec, torch.float32, seed)
    from_fused, from_pieces = Block(spec), Block(spec)
    names = load(from_fused, fused_checkpoint(weights), spec)
    ckpt = per_expert_checkpoint(weights)
    keys = list(ckpt)
    torch.manual_seed(seed)
    shuffled = {keys[i]: ckpt[keys[i]] for i in torch.randperm(len(keys)).tolist()}
    assert load(from_pieces, shuffled, spec) == names
    for (name, a), (_, b) in zip(from_fused.named_parameters(), from_pieces.named_parameters()):
        assert torch.equal(a, b), name


def gpt_oss_like() -> Spec:
    return Spec(4, 8, 6, is_concatenated=False, is_transposed=True, has_bias=True)


def test_missing_expert_is_named_in_one_line():
    spec = gpt_oss_like()
    ckpt = per_expert_checkpoint(HFWeights.random(spec, torch.float32))
    del ckpt["root.block.experts.2.b.weight"]
    with pytest.raises(ValueError) as error:
        load(Block(spec), ckpt, spec)
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith(
        "1 parameter(s) not loaded ['block.experts.gate_up_proj (no block.experts.2.b.weight)']"
    )


def test_a_source_with_no_tensor_at_all_is_named_by_its_pattern():
    spec = Spec(3, 8, 4)
    ckpt = per_expert_checkpoint(HFWeights.random(spec, torch.float32))
    ckpt = {k: v for k, v in ckpt.items() if ".b." not in k}
    with pytest.raises(
        ValueError, match=r"\(no key matching experts\\\\.\(\\\\d\+\)\\\\.b\\\\.weight\)"
    ):
        load(Block(spec), ckpt, spec)


def test_many_missing_experts_are_counted():
    spec = Spec(40, 8, 4)
    ckpt = per_expert_checkpoint(HFWeights.random(spec, torch.float32))
    ckpt = {k: v for k, v in ckpt.items() if ".c." not in k or ".experts.3." in k}
    with pytest.raises(
        ValueError,
        match=r"down_proj \(no block.experts.0.c.weight, block.experts.1.c.weight, "
        r"block.experts.2.c.weight, \.\.\. \(39 in all\)\)",
    ):
        load(Block(spec), ckpt, spec)


def test_piece_of_the_wrong_shape_names_parameter_and_key():
    spec = Spec(3, 8, 4)
    ckpt = per_expert_checkpoint(HFWeights.random(spec, torch.float32))
    ckpt["root.block.experts.1.a.weight"] = torch.randn(5, 8)
    with pytest.raises(
        ValueError,
        match=r"block.experts.gate_up_proj \(checkpoint root.block.experts.1.a.weight\): "
        r"checkpoint tensor has shape \(5, 8\), expected \(4, 8\)",
    ):
        load(Block(spec), ckpt, spec)


def test_concatenation_along_the_wrong_dim_is_refused():
    spec = Spec(3, 8, 8)  # square pieces: only the dim check can tell
    table = [(
        (("merge_modulelist", 0), ("concatenate", 2)),
        [r"experts\.(\d+)\.a\.weight", r"experts\.(\d+)\.b\.weight"],
        ["experts.gate_up_proj"],
    )]  # fmt: skip
    with pytest.raises(ValueError, match="parts concatenated along dim 2"):
        load_checkpoint(
            Block(spec), [("block.experts.0.a.weight", torch.randn(8, 8))], renames=[],
            stacked_params_mapping=[], prefix="", ignored=[], tied=set(), converters=table,
        )  # fmt: skip


def test_unsupported_chain_is_one_clear_error():
    table = [((("merge_modulelist", 0), ("transpose", 1)), [r"x\.(\d+)"], ["y"])]
    with pytest.raises(ValueError, match="merge_modulelist \\+ transpose .* is not supported"):
        load_checkpoint(
            Block(Spec(2, 8, 4)), [], renames=[], stacked_params_mapping=[], prefix="",
            ignored=[], tied=set(), converters=table,
        )  # fmt: skip


def test_other_tensors_still_load_beside_experts():
    spec = Spec(2, 8, 4)
    model = Block(spec)
    model.block.norm = nn.LayerNorm(8)
    ckpt = per_expert_checkpoint(HFWeights.random(spec, torch.float32))
    ckpt["root.block.norm.weight"] = torch.ones(8)
    ckpt["root.block.norm.bias"] = torch.zeros(8)
    assert "block.norm.weight" in load(model, ckpt, spec)


@pytest.mark.parametrize("per_expert", [True, False])
def test_host_tensors_load_into_parameters_on_another_device(per_expert):
    """Checkpoint tensors arrive on the host; the parameters live on the GPU. Every
    copy moves the tensor to the parameter's device (the meta device stands in for it
    here: a missing move raises there as on CUDA)."""
    from runtime.moe import FusedMoE
    from runtime.parallel import ModuleListShard

    with torch.device("meta"):
        layer = FusedMoE(4, 8, 6)
    gate_up = layer.gate_up_proj
    if per_expert:
        for expert in range(4):
            for part in range(2):
                shard = ModuleListShard(expert, part, 2, 0, 1)
                gate_up.weight_loader(gate_up, torch.randn(6, 8), shard)
    else:
        gate_up.weight_loader(gate_up, torch.randn(4, 12, 8))
    layer.down_proj.weight_loader(layer.down_proj, torch.randn(4, 8, 6))
