"""Attention-interface calls that differ only in their value (DiffLlama's differential
attention) become one paged attention over the values side by side; calls that differ in
anything else still stop the conversion."""

from __future__ import annotations

import pytest

from converter.cst_helpers import code
from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare

CALL = """        attn_output, attn_weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
"""
TWO = """        odd_a, odd_b = v.chunk(2, dim=-1)
        out_a, attn_weights = attention_interface(
            self, q, k, odd_a, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        out_b, _ = attention_interface(
            self, q, k, odd_b, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        attn_output = out_a - 0.5 * out_b
"""


def test_calls_differing_in_value_share_one_paged_attention():
    assert CALL in TINY
    module, ctx = prepare(TINY.replace(CALL, TWO), through="attention")
    attn = code_of(module, "TinyAttention")
    assert "torch.cat([odd_a, odd_b], dim=-1).transpose(1, 2)[0]" in attn
    assert ".unflatten(-1, (-1, self.attn.v_head_dim))[None].chunk(2, dim=-1)" in attn
    assert "out_a = paged_outputs[0]" in attn and "out_b = paged_outputs[1]" in attn
    assert attn.count("self.attn(") == 1
    assert code(ctx.paged_attention["TinyAttention"]["v_head_dim"]) == "2 * (self.head_size // 2)"


def test_calls_differing_in_more_than_value_stop():
    other_key = TWO.replace("self, q, k, odd_b,", "self, q, k + 1, odd_b,")
    with pytest.raises(ConversionError, match="two attention-interface calls in one forward"):
        prepare(TINY.replace(CALL, other_key), through="attention")
    other_scale = TWO.replace(
        "odd_b, attention_mask, dropout=0.0, scaling=self.scaling",
        "odd_b, attention_mask, dropout=0.0, scaling=2.0",
    )
    with pytest.raises(ConversionError, match="two attention-interface calls in one forward"):
        prepare(TINY.replace(CALL, other_scale), through="attention")


def test_calls_in_different_branches_are_not_grouped():
    branches = TWO.replace(
        "        out_b, _ = attention_interface(",
        "        if self.config.odd_flag:\n            out_b, _ = attention_interface(",
    ).replace(
        "            self, q, k, odd_b, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs\n        )\n",
        "                self, q, k, odd_b, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs\n            )\n",
    )
    with pytest.raises(ConversionError, match="two attention-interface calls in one forward"):
        prepare(TINY.replace(CALL, branches), through="attention")
