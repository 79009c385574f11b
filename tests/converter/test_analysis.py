"""Roles are found by structure (ownership + attention-interface calls), not names."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, prepare


def test_roles_by_structure():
    _, ctx = prepare(upto="imports")
    assert ctx.lm_class == "TinyForCausalLM"
    assert ctx.base_model_path == ("backbone",) and ctx.base_model_class == "TinyModel"
    # `norms` is the first ModuleList; the stack is the one whose element owns attention
    assert ctx.stack_path == ("backbone", "blocks") and ctx.decoder_layer_class == "TinyBlock"
    assert ctx.attention_classes == ["TinyAttention"] and ctx.attention_attr == "attn_core"
    assert ctx.norm_classes == ["TinyNorm"]
    child = ctx.classes["TinyModel"].children["blocks"]
    assert child.in_list and child.cls == "TinyBlock" and child.ctor == "TinyBlock"
    assert ctx.classes["TinyAttention"].children["qkv"].ctor == "nn.Linear"
    assert "num_attention_heads" in ctx.classes["TinyAttention"].config_reads


def test_two_lm_heads_is_an_error():
    source = TINY.replace("class TinyForSequenceClassification", "class TinyOtherForCausalLM")
    with pytest.raises(ConversionError, match="exactly one \\*ForCausalLM"):
        prepare(source, upto="imports")


def test_no_attention_interface_is_an_error():
    source = TINY.replace("ALL_ATTENTION_FUNCTIONS.get_interface(", "dict.get(")
    with pytest.raises(ConversionError, match="attention interface") as err:
        prepare(source, upto="imports")
    assert "modeling_tiny.py:" in str(err.value)
