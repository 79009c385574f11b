"""eager_core: a hand-written softmax attention core (Bloom/MPT style, no attention
interface) becomes one PagedAttention call; scale and ALiBi come from the source."""

import pytest

from converter.errors import ConversionError
from converter.pipeline import load_rules
from tests.converter.snippets import TINY, code_of, prepare

INTERFACE_CORE = TINY[
    TINY.index("        if cache is not None:\n") : TINY.index("        return self.resid_drop")
]
EAGER_CORE = """        if cache is not None:
            k, v = cache.update(k, v, 0)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        scores = scores + position_bias
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, torch.finfo(q.dtype).min)
        probs = nn.functional.softmax(scores.float(), dim=-1).to(v.dtype)
        context = torch.matmul(probs, v)
        context = context.permute(0, 2, 1, 3).contiguous().view(*input_shape, -1)
        attn_output = self.out(context)
        return attn_output, probs
"""
EAGER = TINY.replace(
    INTERFACE_CORE + "        return self.resid_drop(self.out(attn_output)), attn_weights\n",
    EAGER_CORE,
)
EAGER = EAGER.replace(
    "def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):",
    "def forward(self, hidden_states, position_bias, attention_mask=None, cache=None, **kwargs):",
)
EAGER = EAGER.replace(
    "self.attn_core(self.ln(hidden_states), attention_mask, cache, **kwargs)",
    "self.attn_core(self.ln(hidden_states), alibi, attention_mask, cache, **kwargs)",
)
EAGER = EAGER.replace(
    "        hidden_states = inputs_embeds\n",
    "        hidden_states = inputs_embeds\n        alibi = build_bias(hidden_states.shape[1], self.config.num_attention_heads)\n",
)
EAGER = EAGER.replace(
    "def double(x):",
    "def build_bias(length, heads):\n    return torch.arange(length)[None, None] * torch.ones(heads, 1, 1)\n\n\ndef double(x):",
)
EAGER = EAGER.replace(
    "hidden_states = block(hidden_states, mask,",
    "hidden_states = block(hidden_states, alibi, mask,",
)
EAGER = EAGER.replace(
    "def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, **kwargs):",
    "def forward(self, hidden_states, alibi, attention_mask=None, cache=None, use_cache=False, **kwargs):",
)


def _rules(slopes: bool):
    rules = load_rules()
    if slopes:
        rules["architectures"]["tiny"] = {
            "alibi": {"bias": "position_bias", "slopes": "torch.ones(config.num_attention_heads)"}
        }
    return rules


def test_core_becomes_one_paged_call(monkeypatch):
    assert "softmax" in EAGER and "attention_interface" not in EAGER.split("class TinyBlock")[0]
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: _rules(True))
    module, ctx = prepare(EAGER)
    attn = code_of(module, "TinyAttention")
    assert ctx.eager_attention and ctx.attention_classes == ["TinyAttention"]
    assert (
        "context = self.attn(q.transpose(1, 2)[0], k.transpose(1, 2)[0], v.transpose(1, 2)[0], "
        "kv_cache, input_metadata)[None]" in attn
    )
    for gone in ("softmax", "matmul", "position_bias", "masked_fill", "permute"):
        assert gone not in attn.split("def forward")[1], gone
    assert "return attn_output, None" in attn  # the probabilities are not computed any more
    # scale: the factor multiplied into q·kᵀ; ALiBi slopes from rules
    assert (
        "self.attn = PagedAttention(config.num_attention_heads, self.head_size, self.scaling, "
        "alibi=Alibi(torch.ones(config.num_attention_heads)))" in attn
    )
    model = code_of(module, "TinyModel")
    assert "build_bias" not in model and "alibi" not in model  # builder call and args gone


def test_divided_scores_and_no_alibi(monkeypatch):
    source = EAGER.replace(
        "torch.matmul(q, k.transpose(-1, -2)) * self.scaling",
        "q @ k.transpose(-1, -2)\n        scores /= math.sqrt(self.head_size)",
    ).replace("        scores = scores + position_bias\n", "")
    assert source != EAGER
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: _rules(False))
    module, _ = prepare(source, through="attention")
    attn = code_of(module, "TinyAttention")
    assert (
        "PagedAttention(config.num_attention_heads, self.head_size, 1 / (math.sqrt(self.head_size)))"
        in attn
    )


def test_core_without_cache_update_converts(monkeypatch):
    # no cache: the paged call stores K/V itself, right after q, k and v are final
    source = EAGER.replace(
        "        if cache is not None:\n            k, v = cache.update(k, v, 0)\n", ""
    )
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: _rules(True))
    module, _ = prepare(source, through="attention")
    forward = code_of(module, "TinyAttention").split("def forward")[1]
    assert (
        "v = v.view(shape).transpose(1, 2)\n        context = self.attn(q.transpose(1, 2)[0], k.transpose(1, 2)[0]"
        in forward
    )
    assert "softmax" not in forward


def test_undeclared_score_bias_is_refused(monkeypatch):
    # without an [<type>.alibi] rule, position_bias is a bias the kernel would drop
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: _rules(False))
    with pytest.raises(ConversionError, match=r"adds forward input\(s\) \['position_bias'\]"):
        prepare(EAGER, through="attention")


def test_dropped_name_rebound_after_the_core(monkeypatch):
    # reads of the probabilities become None until the forward binds the name again
    source = EAGER.replace(
        "        attn_output = self.out(context)\n        return attn_output, probs\n",
        "        attn_output = self.out(context)\n        kept = probs\n"
        "        probs = attn_output * 0\n        return attn_output + probs, kept\n",
    )
    assert "kept = probs" in source
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: _rules(True))
    module, _ = prepare(source, through="attention")
    forward = code_of(module, "TinyAttention").split("def forward")[1]
    assert "kept = None" in forward and "probs = attn_output * 0" in forward
    assert "return attn_output + probs, kept" in forward
