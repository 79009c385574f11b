"""The parity check must be able to fail: break the model on purpose and watch it.

- Mistral with its sliding window switched off in every PagedAttention: prompts are
  longer than the window (4), so logits must move far beyond the tolerance.
- A checkpoint key renamed the way a missing conversion rule would leave it: the strict
  `load_weights` must name the unknown key and the parameter left unloaded.
- A tensor of the wrong shape: the error names the parameter and both shapes.
"""

from __future__ import annotations

import pytest
from harness import ATOL, generated_records, report

from runtime.attention import attention_layers
from runtime.engine.build_model import build_model
from runtime.loader import iter_weights


def test_sliding_window_off_breaks_parity(cases):
    case = cases("mistral")

    def no_window(model):
        for layer in attention_layers(model):
            assert layer.sliding_window == 4
            layer.sliding_window = None

    result = report(case, generated_records(case, tweak=no_window))
    print("mistral without sliding window:", result.format())
    assert result.max_diff > 100 * ATOL


def _model_and_weights(case):
    model = build_model(case.model_dir)
    return model, dict(iter_weights(case.model_dir))


def test_unknown_key_and_missing_param_are_named(cases):
    model, weights = _model_and_weights(cases("llama"))
    weights["model.final_norm.weight"] = weights.pop("model.norm.weight")
    with pytest.raises(ValueError) as err:
        model.load_weights(weights.items())
    message = str(err.value)
    assert "model.final_norm.weight" in message and "'model.norm.weight'" in message


def test_shape_mismatch_names_param_and_shapes(cases):
    model, weights = _model_and_weights(cases("llama"))
    weights["model.norm.weight"] = weights["model.norm.weight"][:-1]
    with pytest.raises(
        ValueError,
        match=r"model\.norm\.weight.*\(63,\).*\(64,\)|model\.norm\.weight.*\(64,\).*\(63,\)",
    ):
        model.load_weights(weights.items())


def test_checkpoint_without_base_prefix_loads(cases):
    """Keys saved without `model.` (the bare base model) still reach every parameter."""
    model, weights = _model_and_weights(cases("llama"))
    bare = {k.removeprefix("model."): v for k, v in weights.items()}
    loaded = model.load_weights(bare.items())
    assert loaded == set(dict(model.named_parameters()))
