"""The MoE parity checks can fail: a router that drops one of its options must miss.

The converter keeps each router as the source's own code, so a generated module reads
`norm_topk_prob`, the correction bias, `routed_scaling_factor`, grouped top-k, the top-k
itself, the shared-expert gate, gpt-oss's SwiGLU clamp and DBRX's p-norm normalisation
(and its clip_qkv) exactly where HF does. Each
case builds the COMMITTED module from coverage's tiny checkpoint (the same one
test_parity_shipped.py checks at parity) with one option flipped, in the config or in a
loaded buffer / weight, and the logits must move far beyond the parity tolerance against
HF's reference of the unflipped model: a router that silently ignored the option would
still pass.
"""

from __future__ import annotations

import pytest
import torch

from hf2paged.verify.coverage_job import scenario
from hf2paged.verify.parity import compare, run_generated
from runtime.engine.build_model import build_model
from runtime.loader import load_config


def _zero(name: str):
    """A tweak zeroing every parameter / buffer whose name ends in `name`."""

    def tweak(model: torch.nn.Module) -> int:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        hits = [t for n, t in tensors.items() if n.endswith(name)]
        with torch.no_grad():
            for t in hits:
                t.zero_()
        return len(hits)

    return tweak


def _flip(field: str):
    return lambda config: {field: not getattr(config, field)}


def _sub(sub: str, **values):
    """Changes of a sub-config (DBRX's ffn_config / attn_config): a copy with `values`."""

    def changes(config):
        copy = type(getattr(config, sub))(**getattr(config, sub).to_dict())
        for field, value in values.items():
            assert hasattr(copy, field), f"{sub} has no {field}"
            setattr(copy, field, value)
        return {sub: copy}

    return changes


# (model type, generated module, what is flipped, config changes(config) or None,
#  tweak(model) -> how many tensors it changed, or None)
CASES = [
    ("qwen3_moe", "qwen3_moe", "norm_topk_prob", _flip("norm_topk_prob"), None),
    ("olmoe", "olmoe", "norm_topk_prob", _flip("norm_topk_prob"), None),
    ("deepseek_v3", "deepseek_v3", "norm_topk_prob", _flip("norm_topk_prob"), None),
    (
        "deepseek_v3",
        "deepseek_v3",
        "routed_scaling_factor",
        lambda c: {"routed_scaling_factor": c.routed_scaling_factor * 2},
        None,
    ),
    # grouped top-k: 2 of 4 groups -> every group (plain top-k over all experts)
    ("deepseek_v3", "deepseek_v3", "topk_group", lambda c: {"topk_group": c.n_group}, None),
    (
        "deepseek_v3",
        "deepseek_v3",
        "e_score_correction_bias",
        None,
        _zero("e_score_correction_bias"),
    ),
    ("glm4_moe", "glm4_moe", "e_score_correction_bias", None, _zero("e_score_correction_bias")),
    ("mixtral", "mixtral", "num_experts_per_tok", lambda c: {"num_experts_per_tok": 1}, None),
    ("granitemoe", "granitemoe", "num_experts_per_tok", lambda c: {"num_experts_per_tok": 1}, None),
    # PhiMoE's sparsemixer routes by its jitter threshold and always picks 2 experts
    ("phimoe", "phimoe", "router_jitter_noise", lambda c: {"router_jitter_noise": 0.5}, None),
    ("qwen2_moe", "qwen2_moe", "shared_expert_gate", None, _zero("shared_expert_gate.weight")),
    # the clamp of gpt-oss's SwiGLU (FusedMoE limit=), tightened so it bites
    ("gpt_oss", "gpt_oss", "swiglu_limit", lambda c: {"swiglu_limit": 0.05}, None),
    # DBRX: the p-norm normalisation of the top-k weights dropped, one expert instead of
    # two, and the clamp of its fused QKV (clip_qkv) loosened until it never bites (None
    # fails in HF's own code: torch.clamp needs a bound)
    (
        "dbrx",
        "dbrx",
        "moe_normalize_expert_weights",
        _sub("ffn_config", moe_normalize_expert_weights=None),
        None,
    ),
    (
        "dbrx",
        "dbrx",
        "moe_normalize_expert_weights p",
        _sub("ffn_config", moe_normalize_expert_weights=2.0),
        None,
    ),
    ("dbrx", "dbrx", "moe_top_k", _sub("ffn_config", moe_top_k=1), None),
    ("dbrx", "dbrx", "clip_qkv", _sub("attn_config", clip_qkv=1e6), None),
]


@pytest.mark.parametrize(
    "model_type, module, what, changes, tweak",
    CASES,
    ids=[f"{c[0]}-{c[2]}" for c in CASES],
)
def test_a_flipped_router_option_misses(tiny_cases, model_type, module, what, changes, tweak):
    case = tiny_cases(model_type, module)
    config = load_config(case.model_dir)
    if changes is not None:
        for field, value in changes(config).items():
            assert hasattr(config, field), f"{model_type} has no {field}"
            setattr(config, field, value)
    model = build_model(case.model_dir, config=config)
    assert type(model).__module__ == f"generated.{module}"
    if tweak is not None:
        assert tweak(model) > 0, f"{model_type}: nothing named {what}"
    result = compare(module, run_generated(model, case.tokens, scenario()), case.reference)
    print(f"{model_type} with {what} flipped:", result.format())
    assert result.max_diff > 10 * case.tolerance, result.format()
