"""attention: the interface call becomes PagedAttention built from the call's own args."""

import pytest

from converter.cst_helpers import code
from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare


def test_sink_and_constructor():
    module, ctx = prepare(through="attention")
    attn = code_of(module, "TinyAttention")
    assert (
        "attn_output = self.attn(q.transpose(1, 2)[0], k.transpose(1, 2)[0], "
        "v.transpose(1, 2)[0], kv_cache, input_metadata).unflatten(-1, (-1, self.attn.head_dim))"
        "[None]  # [1, T, Hq, D]" in attn
    )
    # head size from the source's own view (`head_size`, not `head_dim`), scale verbatim
    assert (
        "self.attn = PagedAttention(config.num_attention_heads, self.head_size, self.scaling)"
        in attn
    )
    assert "get_interface" not in attn
    assert "return self.out(attn_output), None" in attn  # attention weights -> None
    assert "from runtime.attention import InputMetadata, PagedAttention" in module.code
    assert code(ctx.paged_attention["TinyAttention"]["scale"]) == "self.scaling"


def test_call_expressions_move_into_the_constructor():
    source = TINY.replace(
        "scaling=self.scaling,", "scaling=1.0, sliding_window=self.config.window, softcap=7.5,"
    )
    module, _ = prepare(source, through="attention")
    assert (
        "PagedAttention(config.num_attention_heads, self.head_size, 1.0, "
        "sliding_window=self.config.window, logits_soft_cap=7.5)"
        in code_of(module, "TinyAttention")
    )


def test_gqa_heads_from_the_views():
    source = TINY.replace(
        "k = k.view(shape)", "k = k.view(*input_shape, self.kv_heads, self.head_size)"
    )
    source = source.replace(
        "        self.scaling =", "        self.kv_heads = 2\n        self.scaling ="
    )
    module, _ = prepare(source, through="attention")
    assert "num_kv_heads=self.kv_heads" in code_of(module, "TinyAttention")


@pytest.mark.parametrize(
    "change, message",
    [
        ("scaling=self.scaling,", "odd_bias=self.bias, scaling=self.scaling,"),
        ("scaling=self.scaling,", "dropout=0.0,"),
        ("scaling=self.scaling,", "scaling=input_shape[0],"),
    ],
)
def test_unsupported_calls_fail_loudly(change, message):
    source = TINY.replace("dropout=0.0, scaling=self.scaling,", message)
    with pytest.raises(ConversionError) as err:
        prepare(source, through="attention")
    assert "modeling_tiny.py:" in str(err.value)


def test_alternative_attention_branch_keeps_the_sink():
    # GPT-2: an eager-only upcast path computes the same output another way
    source = TINY.replace(
        "        attn_output, attn_weights = attention_interface(",
        "        if self.config.upcast:\n"
        "            attn_output, attn_weights = self._upcast(q, k, v, attention_mask)\n"
        "        else:\n"
        "          attn_output, attn_weights = attention_interface(",
    )
    module, _ = prepare(source, through="attention")
    attn = code_of(module, "TinyAttention")
    assert "_upcast" not in attn and "if self.config.upcast" not in attn
    assert "attn_output = self.attn(" in attn


def test_non_causal_attention_is_refused():
    source = TINY.replace(
        "        self.scaling =", "        self.is_causal = False\n        self.scaling ="
    )
    with pytest.raises(ConversionError, match="not causal"):
        prepare(source, through="attention")
    source = TINY.replace(
        "        self.scaling =",
        "        self.is_causal = not config.bidirectional\n        self.scaling =",
    )
    module, _ = prepare(source, through="attention")
    assert "if not self.is_causal:\n            raise ValueError(" in code_of(
        module, "TinyAttention"
    )


def test_interface_arguments_bound_by_keyword():
    # dory passes attention_mask=...; any of q/k/v may come by keyword too
    source = TINY.replace(
        "self, q, k, v, attention_mask, dropout=0.0,",
        "self, q, value=v, attention_mask=attention_mask, key=k, dropout=0.0,",
    )
    attn = code_of(prepare(source, through="attention")[0], "TinyAttention")
    assert "self.attn(q.transpose(1, 2)[0], k.transpose(1, 2)[0], v.transpose(1, 2)[0]," in attn
    twice = TINY.replace(
        "self, q, k, v, attention_mask, dropout=0.0,",
        "self, q, k, v, attention_mask, value=v, dropout=0.0,",
    )
    with pytest.raises(ConversionError, match="does not bind .* once each"):
        prepare(twice, through="attention")
