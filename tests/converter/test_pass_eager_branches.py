"""Eager cores behind branches (Falcon's pattern, with unusual names): a dict-dispatched
attention class, a fused-kernel arm next to the softmax arm, one core per arm of an
``if bias is None`` branch, the bias scaled with the scores, [B, H, T, D] views and a
forward-local K/V head count."""

import pytest

from converter.errors import ConversionError
from converter.pipeline import load_rules
from tests.converter.snippets import code_of, prepare
from tests.converter.test_pass_eager_core import EAGER, EAGER_CORE

# rotary-like arm: sdpa next to the softmax core; bias arm: (q·kᵀ + bias) * scale
BRANCHED_CORE = """        if cache is not None:
            k, v = cache.update(k, v, 0)
        if position_bias is None:
            if self.config._attn_implementation == "sdpa":
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
                probs = None
            else:
                scores = torch.matmul(q, k.transpose(-1, -2)) SCALE_A
                probs = nn.functional.softmax(scores + attention_mask, dim=-1, dtype=hidden_states.dtype)
                context = torch.matmul(probs, v)
            context = context.transpose(1, 2).reshape(*input_shape, -1)
            attn_output = self.out(context)
            return attn_output, probs
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))
            biased = scores + position_bias
            biased *= self.scaling
            probs = nn.functional.softmax(biased, dim=-1)
            context = torch.matmul(probs, v)
            context = context.permute(0, 2, 1, 3).contiguous().view(*input_shape, -1)
            attn_output = self.out(context)
            return attn_output, probs
"""
DISPATCHED = (
    EAGER.replace(EAGER_CORE, BRANCHED_CORE)
    .replace(
        "        self.attn_core = TinyAttention(config, layer_idx)\n",
        "        impl = config._attn_implementation\n"
        "        self.attn_core = CORE_KINDS[impl](config, layer_idx)\n",
    )
    .replace(
        "class TinyBlock(",
        "class TinyFastAttention(TinyAttention):\n"
        "    def forward(self, hidden_states, position_bias, attention_mask=None, cache=None):\n"
        "        return fast_kernel(hidden_states), None\n\n\n"
        'CORE_KINDS = {"sdpa": TinyAttention, "eager": TinyAttention, "fast": TinyFastAttention}\n\n\n'
        "class TinyBlock(",
    )
)


def _rules(enabled: str | None = "use_bias"):
    rules = load_rules()
    alibi = {"bias": "position_bias", "slopes": "torch.ones(config.num_attention_heads)"}
    if enabled:
        alibi["enabled"] = enabled
    rules["architectures"]["tiny"] = {"alibi": alibi}
    return rules


def _convert(monkeypatch, source, rules):
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: rules)
    return prepare(source, through="prune")


def test_dispatched_class_and_branch_local_cores(monkeypatch):
    source = DISPATCHED.replace("SCALE_A", "* self.scaling")
    module, ctx = _convert(monkeypatch, source, _rules())
    # the table resolves to the class the other entries derive from
    assert ctx.attention_classes == ["TinyAttention"] and ctx.dispatch == {
        "CORE_KINDS": "TinyAttention"
    }
    block = code_of(module, "TinyBlock")
    assert "self.attn_core = TinyAttention(config, layer_idx)" in block
    assert "impl" not in block  # the key's local picked an entry; nothing reads it now
    assert "CORE_KINDS" not in module.code and "TinyFastAttention" not in module.code
    attn = code_of(module, "TinyAttention")
    forward = attn.split("def forward")[1]
    assert "scaled_dot_product_attention" not in forward and "softmax" not in forward
    # one paged call per arm; both arms then read the same, so they merge into one block
    assert forward.count("self.attn(q.transpose(1, 2)[0]") == 1 and "else:" not in forward
    assert "position_bias" not in forward
    # both arms scale by self.scaling; the bias arm's scale multiplies the bias too
    assert (
        "PagedAttention(config.num_attention_heads, self.head_size, self.scaling, "
        "alibi=Alibi(torch.ones(config.num_attention_heads), scale=self.scaling) "
        "if config.use_bias else None)" in attn
    )
    assert "alibi" not in code_of(module, "TinyModel")  # the bias builder goes


def test_arms_with_different_scales(monkeypatch):
    source = DISPATCHED.replace("SCALE_A", "/ math.sqrt(self.head_size)")
    module, _ = _convert(monkeypatch, source, _rules())
    attn = code_of(module, "TinyAttention")
    assert "self.scaling if config.use_bias else 1 / (math.sqrt(self.head_size))" in attn.replace(
        "\n", " "
    )


def test_bias_arm_without_enabled_rule_is_refused(monkeypatch):
    source = DISPATCHED.replace("SCALE_A", "* self.scaling")
    with pytest.raises(ConversionError, match="one arm of this branch adds the ALiBi bias"):
        _convert(monkeypatch, source, _rules(enabled=None))


def test_bias_added_after_scaling_keeps_slopes(monkeypatch):
    # (q·kᵀ) * s + bias: the bias is not scaled
    source = DISPATCHED.replace("SCALE_A", "* self.scaling").replace(
        "            biased = scores + position_bias\n            biased *= self.scaling\n",
        "            biased = scores * self.scaling + position_bias\n",
    )
    module, _ = _convert(monkeypatch, source, _rules())
    attn = code_of(module, "TinyAttention")
    assert "alibi=Alibi(torch.ones(config.num_attention_heads)) if config.use_bias" in attn


HEAD_VIEWS = (
    "        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n"
    "        q = q.view(shape).transpose(1, 2)\n"
    "        k = k.view(shape).transpose(1, 2)\n"
    "        v = v.view(shape).transpose(1, 2)\n"
)
BHTD_VIEWS = (
    "        n_kv = self.groups if self.grouped else self.n_heads\n"
    "        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n"
    "        b, t = input_shape\n"
    "        q = q.view(b, t, -1, self.head_size).transpose(1, 2).reshape(b, self.n_heads, t, self.head_size)\n"
    "        k = k.view(b, t, -1, self.head_size).transpose(1, 2).reshape(b, n_kv, t, self.head_size)\n"
    "        v = v.view(b, t, -1, self.head_size).transpose(1, 2).reshape(b, n_kv, t, self.head_size)\n"
)


def test_bhtd_views_and_local_kv_heads(monkeypatch):
    source = (
        EAGER.replace(HEAD_VIEWS, BHTD_VIEWS)
        .replace("        scores = scores + position_bias\n", "")
        .replace(
            "        self.scaling = self.head_size**-0.5\n",
            "        self.scaling = self.head_size**-0.5\n"
            "        self.n_heads = config.num_attention_heads\n"
            "        self.groups = config.num_key_value_heads\n"
            "        self.grouped = config.grouped\n",
        )
    )
    assert source.count("n_kv") == 3
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: _rules(None))
    module, _ = prepare(source, through="attention")
    attn = code_of(module, "TinyAttention")
    # heads from the [B, H, T, D] reshape (not its T), the K/V count inlined from its local
    assert (
        "PagedAttention(self.n_heads, self.head_size, self.scaling, "
        "num_kv_heads=self.groups if self.grouped else self.n_heads)" in attn
    )


def test_dispatch_key_local_in_a_branch_goes(monkeypatch):
    source = DISPATCHED.replace("SCALE_A", "* self.scaling").replace(
        "        impl = config._attn_implementation\n"
        "        self.attn_core = CORE_KINDS[impl](config, layer_idx)\n",
        "        if config.num_hidden_layers > 0:\n"
        "            impl = config._attn_implementation\n"
        "            self.attn_core = CORE_KINDS[impl](config, layer_idx)\n",
    )
    assert "        if config.num_hidden_layers > 0:" in source
    module, _ = _convert(monkeypatch, source, _rules())
    block = code_of(module, "TinyBlock")
    assert "self.attn_core = TinyAttention(config, layer_idx)" in block and "impl" not in block


def test_paged_attention_rule_overrides_reach_eager_cores(monkeypatch):
    rules = _rules()
    rules["architectures"]["tiny"]["paged_attention"] = {"num_kv_heads": "config.groups"}
    source = DISPATCHED.replace("SCALE_A", "* self.scaling")
    module, _ = _convert(monkeypatch, source, rules)
    attn = code_of(module, "TinyAttention").replace("\n", " ")
    assert "num_kv_heads=config.groups," in attn


def test_arms_that_differ_stay_branches(monkeypatch):
    arm_b = "contiguous().view(*input_shape, -1)\n            attn_output = self.out(context)"
    source = DISPATCHED.replace("SCALE_A", "* self.scaling").replace(arm_b, arm_b + " * 2")
    assert source.count("self.out(context) * 2") == 1
    module, _ = _convert(monkeypatch, source, _rules())
    forward = code_of(module, "TinyAttention").split("def forward")[1]
    assert forward.count("self.attn(q.transpose(1, 2)[0]") == 2
    assert "if self.attn.alibi is None:" in forward  # the bias test, now static


def test_bfloat16_bias_is_scaled_after_rounding(monkeypatch):
    # [<type>.alibi] dtype: the builder rounds slope * position in bfloat16; the factor
    # applied after the bias joined the scores scales the built bias (Alibi's scale)
    rules = _rules()
    rules["architectures"]["tiny"]["alibi"]["dtype"] = "bfloat16"
    source = DISPATCHED.replace("SCALE_A", "* self.scaling")
    module, _ = _convert(monkeypatch, source, rules)
    attn = " ".join(code_of(module, "TinyAttention").split())
    assert (
        "alibi=Alibi(torch.ones(config.num_attention_heads), scale=self.scaling, "
        "dtype=torch.bfloat16) if config.use_bias else None)" in attn
    )
    assert "from runtime.attention import Alibi, InputMetadata, PagedAttention" in module.code


def test_alibi_dtype_the_kernels_cannot_build_is_refused(monkeypatch):
    rules = _rules()
    rules["architectures"]["tiny"]["alibi"]["dtype"] = "float16"
    source = DISPATCHED.replace("SCALE_A", "* self.scaling")
    with pytest.raises(ConversionError, match="dtype = 'float16'"):
        _convert(monkeypatch, source, rules)
