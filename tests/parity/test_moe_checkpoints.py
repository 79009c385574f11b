"""MoE checkpoints in both layouts load strictly through the generated load_weights.

- Per-expert tensors (`experts.N.w1/w3/w2`, `experts.N.gate_proj/up_proj/down_proj`): the
  layout `save_pretrained` writes by default (transformers reverses its conversions) and
  the released checkpoints have; the generated table replays transformers'
  MergeModulelist [+ Concatenate] chain. test_parity_shipped.py checks these at parity.
- transformers' own fused 3-D layout (`save_original_format=False`, what a checkpoint
  saved from a converted model holds): loads one-to-one, at parity too.
- A per-expert checkpoint missing one expert's tensor stops, naming the parameter and
  the expert it lacks; an expert index beyond the model's is an unknown key.
- Experts stored as 2-D tensors (DBRX's ``mlp.w1 / v1 / w2``, test_parity_shipped.py at
  parity): a missing one is named with the parameter it was to fill.
"""

from __future__ import annotations

import pytest

from hf2paged.verify.coverage_job import scenario
from hf2paged.verify.parity import compare, run_generated
from runtime.engine.build_model import build_model
from runtime.loader import iter_weights

# per-expert originals of three families (w1/w3/w2 with a block rename, gate/up/down
# with shared experts, MLA + dense prefix), and LongCat-Flash's gate_up_proj holding rows
# for its zero experts too; gpt_oss's original is already fused
FUSED = ["mixtral", "qwen2_moe", "deepseek_v3", "longcat_flash"]


@pytest.mark.parametrize("model_type", FUSED)
def test_fused_layout_checkpoint_is_at_parity(tiny_cases, model_type):
    case = tiny_cases(model_type, model_type, fused=True)
    keys = [k for k, _ in iter_weights(case.model_dir)]
    assert any(k.endswith("experts.gate_up_proj") for k in keys), keys
    assert not any(".experts.0." in k for k in keys)
    model = build_model(case.model_dir)
    result = compare(model_type, run_generated(model, case.tokens, scenario()), case.reference)
    print("fused layout", result.format())
    assert result.max_diff <= case.tolerance, result.format()


def _per_expert(tiny_cases):
    case = tiny_cases("mixtral", "mixtral")
    weights = dict(iter_weights(case.model_dir))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in weights
    return build_model(case.model_dir), weights


def test_a_missing_expert_is_named(tiny_cases):
    model, weights = _per_expert(tiny_cases)
    del weights["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    # the parameter, and expert 3's tensor it lacks (named after the block renames)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj "
        r"\(no model\.layers\.0\.mlp\.experts\.3\.w1\.weight\)",
    ):
        model.load_weights(weights.items())


def test_an_expert_beyond_the_model_is_an_unknown_key(tiny_cases):
    model, weights = _per_expert(tiny_cases)
    extra = weights["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    weights["model.layers.0.block_sparse_moe.experts.8.w2.weight"] = extra
    with pytest.raises(ValueError, match=r"experts\.8\.w2"):
        model.load_weights(weights.items())


def test_a_missing_2d_experts_tensor_is_named(tiny_cases):
    case = tiny_cases("dbrx", "dbrx")
    weights = dict(iter_weights(case.model_dir))
    key = "transformer.blocks.1.ffn.experts.mlp.v1"
    assert weights[key].dim() == 2, {k: tuple(v.shape) for k, v in weights.items()}
    model = build_model(case.model_dir)
    del weights[key]
    with pytest.raises(
        ValueError,
        match=r"not loaded \['transformer\.blocks\.1\.ffn\.experts\.gate_up_proj "
        r"\(no transformer\.blocks\.1\.ffn\.experts\.mlp\.v1\)'\]",
    ):
        model.load_weights(weights.items())
