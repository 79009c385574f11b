"""strip: decorators by rule, dropout, **kwargs, output dataclasses, identity calls."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare


def test_training_code_goes():
    module, ctx = prepare(through="strip")
    code = module.code
    assert "auto_docstring" not in code.split("import auto_docstring")[-1]
    attn = code_of(module, "TinyAttention")
    assert "resid_drop" not in attn and "return self.out(attn_output), attn_weights" in attn
    # the parameter goes here; its uses (`**kwargs` at call sites) fall to the pruner
    assert "use_cache=False):" in code_of(module, "TinyBlock")
    assert "TinyBlock.forward" in ctx.kwargs_stripped
    assert "return hidden_states\n" in code_of(module, "TinyModel")
    assert "gradient_checkpointing" not in code


def test_functional_dropout_and_dropout_add():
    source = TINY.replace(
        "        return double(residual + hidden_states)",
        "        hidden_states = nn.functional.dropout(hidden_states, p=0.1, training=self.training)\n"
        "        return double(dropout_add(hidden_states, residual, 0.1, self.training))",
    )
    module, _ = prepare(source, through="strip")
    block = code_of(module, "TinyBlock")
    assert "dropout" not in block
    assert "return double((hidden_states + residual))" in block


def test_unknown_decorator_stops_the_conversion():
    source = TINY.replace("    @auto_docstring\n", "    @mystery_wrapper\n")
    with pytest.raises(ConversionError, match="unknown decorator @mystery_wrapper") as err:
        prepare(source, through="strip")
    assert "rules/training.toml" in str(err.value)


def test_decorators_of_a_local_output_dataclass_are_not_checked():
    # the local output subclass is unwrapped at every return, so its decorators
    # (@dataclass, docs) need no rule; the full pipeline prunes the unused class
    source = TINY.replace(
        "class TinyPreTrainedModel(PreTrainedModel):",
        "@odd_doc_wrapper\n@dataclass\nclass TinyOddOutput(BaseModelOutputWithPast):\n"
        "    extra_states: dict | None = None\n\n\n"
        "class TinyPreTrainedModel(PreTrainedModel):",
    ).replace(
        "return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)",
        "return TinyOddOutput(last_hidden_state=hidden_states, cache=cache)",
    )
    module, _ = prepare(source, through="strip")
    assert "return hidden_states\n" in code_of(module, "TinyModel")
    module, _ = prepare(source)
    assert "TinyOddOutput" not in module.code and "odd_doc_wrapper" not in module.code


def test_mask_builders_are_none():
    # rules/training.toml [calls] none_functions: a mask that travels through a helper
    # (not only into attention) is None, so the helper's `is not None` branches fold
    source = TINY.replace(
        "        hidden_states = inputs_embeds\n",
        '        masks = {"odd": mask}\n        hidden_states = inputs_embeds\n',
    )
    model = code_of(prepare(source, through="strip")[0], "TinyModel")
    assert "mask = None" in model and "create_causal_mask" not in model
