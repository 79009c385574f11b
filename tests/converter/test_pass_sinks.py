"""Attention sinks: the interface's ``s_aux=<expr>`` becomes ``sinks=<expr>`` on the paged
attention call (a per-call tensor, the source's own parameter), and under TP each rank
passes its contiguous block of heads."""

from __future__ import annotations

from tests.converter.snippets import TINY, code_of, prepare
from tests.converter.test_pass_tp import SNIPPET, convert

SINK_TINY = TINY.replace(
    "        self.resid_drop = nn.Dropout(0.1)\n",
    "        self.resid_drop = nn.Dropout(0.1)\n"
    "        self.odd_bias_logits = nn.Parameter(torch.zeros(config.num_attention_heads))\n",
).replace(
    "dropout=0.0, scaling=self.scaling,",
    "dropout=0.0, scaling=self.scaling, s_aux=self.odd_bias_logits,",
)


def test_s_aux_becomes_a_per_call_sinks_argument():
    module, ctx = prepare(SINK_TINY, through="attention")
    attn = code_of(module, "TinyAttention")
    assert "kv_cache, input_metadata, sinks=self.odd_bias_logits)" in attn
    assert "sinks" not in ctx.paged_attention["TinyAttention"]  # not a constructor argument


def test_tp_passes_this_ranks_sinks():
    source = SNIPPET.replace(
        "kv_cache, input_metadata)[None]",
        "kv_cache, input_metadata, sinks=self.per_head_logits)[None]",
    )
    code, _ = convert(source)
    # local_head_block: this rank's block of heads, a None (layers without sinks) kept
    assert "sinks=local_head_block(self.per_head_logits))" in code
    assert "local_head_block" in code.split("from runtime.parallel import")[1].split("\n\n")[0]
