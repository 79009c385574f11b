"""attention: head sizes of fused per-head QKV views (GPT-NeoX, GPT-BigCode MHA) and
per-architecture PagedAttention overrides from rules/architectures.toml."""

from converter.pipeline import load_rules
from tests.converter.snippets import TINY, code_of, prepare

# GPT-NeoX's layout: one view [.., H, 3 * D] per head, then chunk(3) on the last axis.
NEOX = TINY.replace(
    "        shape = (*input_shape, -1, self.head_size)\n"
    "        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n"
    "        q = q.view(shape).transpose(1, 2)\n"
    "        k = k.view(shape).transpose(1, 2)\n"
    "        v = v.view(shape).transpose(1, 2)\n",
    "        shape = (*input_shape, -1, 3 * self.head_size)\n"
    "        qkv = self.qkv(hidden_states).view(shape).transpose(1, 2)\n"
    "        q, k, v = qkv.chunk(3, dim=-1)\n",
)


def test_fused_per_head_view_gives_one_operands_head_size():
    assert NEOX != TINY
    module, _ = prepare(NEOX, through="attention")
    attn = code_of(module, "TinyAttention")
    assert "PagedAttention(config.num_attention_heads, self.head_size, self.scaling)" in attn


def test_split_on_the_view_itself():
    # GPT-BigCode MHA: view(.., H, 3 * D).transpose(1, 2).split(3 * [D], dim=3)
    source = NEOX.replace(
        "        qkv = self.qkv(hidden_states).view(shape).transpose(1, 2)\n"
        "        q, k, v = qkv.chunk(3, dim=-1)\n",
        "        q, k, v = self.qkv(hidden_states).view(shape).transpose(1, 2)"
        ".split(3 * [self.head_size], dim=3)\n",
    )
    assert source != NEOX
    module, _ = prepare(source, through="attention")
    assert "self.head_size, self.scaling)" in code_of(module, "TinyAttention")


def test_unsplit_view_keeps_its_last_dim():
    # a view whose last dim is a product but is never split stays as written
    source = TINY.replace(
        "shape = (*input_shape, -1, self.head_size)",
        "shape = (*input_shape, -1, 1 * self.head_size)",
    )
    source = source.replace(
        "q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)",
        "q = k = v = self.qkv(hidden_states)",
    )
    module, _ = prepare(source, through="attention")
    assert "1 * self.head_size, self.scaling)" in code_of(module, "TinyAttention")


def test_rules_override_paged_attention_arguments(monkeypatch):
    rules = load_rules()
    rules["architectures"]["tiny"] = {"paged_attention": {"num_kv_heads": "self.kv_heads"}}
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: rules)
    source = TINY.replace(
        "        self.scaling =", "        self.kv_heads = 1\n        self.scaling ="
    )
    module, _ = prepare(source, through="attention")
    assert "num_kv_heads=self.kv_heads" in code_of(module, "TinyAttention")
