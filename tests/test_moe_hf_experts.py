"""transformers' own experts classes against FusedMoE loaded from their parameters: the
layout flags ``@use_experts_implementation`` sets and the activations of the configs
select the same function. Also the per-expert checkpoint layout of each model, through
transformers' real converter table (``MergeModulelist`` then ``Concatenate``) replayed by
runtime.checkpoint."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch
from moe_cases import assert_matches, routing
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from runtime.checkpoint import load_checkpoint
from runtime.moe import FusedMoE

# The models plus others of the same classes; every one here is decorated.
MODEL_TYPES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe",
    "granitemoe", "phimoe", "minimax", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "jamba",
]  # fmt: skip
NUM_EXPERTS, HIDDEN, INTER = 6, 16, 8
SIZES = dict(
    hidden_size=HIDDEN, intermediate_size=INTER, moe_intermediate_size=INTER,
    num_local_experts=NUM_EXPERTS, num_experts=NUM_EXPERTS, n_routed_experts=NUM_EXPERTS,
)  # fmt: skip


def hf_experts(model_type: str) -> torch.nn.Module:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    (cls,) = [
        c
        for name, c in inspect.getmembers(module, inspect.isclass)
        if name.endswith("Experts") and c.__module__ == module.__name__
    ]
    config = AutoConfig.for_model(model_type)
    config = getattr(config, "text_config", None) or config
    for key, value in SIZES.items():
        setattr(config, key, value)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    experts = cls(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def fused_like(experts) -> FusedMoE:
    """The FusedMoE the converter is to build for this experts class."""
    kwargs = dict(
        activation=experts.config.hidden_act,
        has_gate=experts.has_gate,
        is_concatenated=experts.is_concatenated,
        is_transposed=experts.is_transposed,
        has_bias=experts.has_bias,
    )
    if hasattr(experts, "alpha") and hasattr(experts, "limit"):  # gpt-oss's _apply_gate
        kwargs.update(alpha=experts.alpha, limit=experts.limit, up_offset=1.0)
    w = experts.gate_up_proj if experts.has_gate else experts.up_proj
    inter = (w.shape[2] if experts.is_transposed else w.shape[1]) // (2 if experts.has_gate else 1)
    return FusedMoE(w.shape[0], HIDDEN, inter, **kwargs)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fused_checkpoint_layout_matches_transformers(model_type):
    experts = hf_experts(model_type)
    layer = fused_like(experts)
    params = dict(layer.named_parameters())
    for name, tensor in experts.named_parameters():
        params[name].weight_loader(params[name], tensor.detach())
    index, weights = routing(23, NUM_EXPERTS, 2, seed=1, busy_experts=4)
    x = torch.randn(23, HIDDEN)
    with torch.no_grad():
        ref = experts(x, index, weights)
    assert_matches(layer(x, index, weights), ref, torch.float32)


def runtime_converters(model_type: str) -> list:
    """transformers' expert WeightConverters as runtime.checkpoint table entries (the
    converter phase generates these; here a direct translation of the globs)."""
    table = []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(conv, "operations", [])]
        if not ops or ops[0][0] != "MergeModulelist":
            continue

        def regex(glob: str) -> str:
            return re.escape(glob).replace(r"\*", r"(\d+)") + r"(?!\w)"

        names = {"MergeModulelist": "merge_modulelist", "Concatenate": "concatenate"}
        table.append(
            (
                tuple((names[op], dim) for op, dim in ops),
                [regex(s) for s in conv._original_source_patterns],
                list(conv._original_target_patterns),
            )
        )
    return table


PER_EXPERT_NAMES = {  # checkpoint names of (gate, up, down) per expert
    "mixtral": ("w1", "w3", "w2"),
    "phimoe": ("w1", "w3", "w2"),
    "minimax": ("w1", "w3", "w2"),
}


@pytest.mark.parametrize("model_type", [m for m in MODEL_TYPES if runtime_converters(m)])
def test_per_expert_checkpoint_through_transformers_converters(model_type):
    experts = hf_experts(model_type)
    layer = fused_like(experts)
    converters = runtime_converters(model_type)
    # the block's attribute name ("mlp", Jamba's "feed_forward"), as the targets spell it
    block = converters[0][2][0].split(".experts")[0].strip(".") or "mlp"
    holder = torch.nn.Module()  # the parameter names a model would have
    setattr(holder, block, torch.nn.Module())
    getattr(holder, block).experts = layer
    gate, up, down = PER_EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
    ckpt = []
    for e in reversed(range(NUM_EXPERTS)):  # any order
        g, u = experts.gate_up_proj[e].detach().chunk(2, dim=0)
        prefix = f"model.layers.0.{block}.experts.{e}"
        ckpt += [(f"{prefix}.{gate}.weight", g), (f"{prefix}.{up}.weight", u)]
        ckpt.append((f"{prefix}.{down}.weight", experts.down_proj[e].detach()))
    loaded = load_checkpoint(
        holder, ckpt, renames=[(r"^model\.layers\.0\.", "")], stacked_params_mapping=[],
        prefix="", ignored=[], tied=set(), converters=converters,
    )  # fmt: skip
    assert loaded == {f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"}
    assert torch.equal(layer.gate_up_proj, experts.gate_up_proj.detach())
    assert torch.equal(layer.down_proj, experts.down_proj.detach())
