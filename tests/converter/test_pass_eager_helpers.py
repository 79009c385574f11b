"""Eager cores written in helper methods (GPT-Neo / GPT-NeoX-Japanese pattern, unusual
names): the softmax helper is inlined, head views come from ``size()[:-1] + (H, D)``
shapes (in a helper too), a banded causal mask buffer becomes a sliding window, any
other mask buffer is refused, ``torch.baddbmm``'s function form reads q second."""

import pytest

from converter.errors import ConversionError
from converter.passes import tidy
from converter.pipeline import load_rules
from tests.converter.snippets import code_of, prepare
from tests.converter.test_pass_eager_core import EAGER, EAGER_CORE

HELPER_CORE = """        if cache is not None:
            k, v = cache.update(k, v, 0)
        mixed, weights = self._score_mix(q, k, v, attention_mask)
        mixed = mixed.permute(0, 2, 1, 3).contiguous().view(*input_shape, -1)
        attn_output = self.out(mixed)
        return attn_output, weights

    def _score_mix(self, qq, kk, vv, mask_in=None):
        qq = qq.to(torch.float32)
        raw = torch.matmul(qq, kk.transpose(-1, -2)) * self.scaling
        n_q, n_k = qq.size(-2), kk.size(-2)
        band = self.tri[:, :, n_k - n_q : n_k, :n_k]
        raw = torch.where(band, raw, torch.finfo(raw.dtype).min)
        if mask_in is not None:
            raw = raw + mask_in
        probs = nn.functional.softmax(raw, dim=-1)
        return torch.matmul(probs, vv), probs
"""
SIZED_VIEWS = """        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        q = self._heads_of(q, self.n_heads, self.head_size)
        k = self._heads_of(k, self.n_heads, self.head_size)
        v = self._heads_of(v, self.n_heads, self.head_size)
"""
HELPER_VIEWS = """
    def _heads_of(self, t, count, size):
        wanted = t.size()[:-1] + (count, size)
        return t.view(wanted).permute(0, 2, 1, 3)
"""
BANDED = """        self.n_heads = config.num_attention_heads
        tri = torch.tril(torch.ones((64, 64), dtype=bool)).view(1, 1, 64, 64)
        if kind == "near":
            tri = torch.bitwise_xor(tri, torch.tril(tri, -config.reach))
        self.tri = nn.Buffer(tri, persistent=False)
"""


def _source(banded: str = BANDED) -> str:
    source = (
        EAGER.replace(EAGER_CORE, HELPER_CORE + HELPER_VIEWS)
        .replace(
            "        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n"
            "        q = q.view(shape).transpose(1, 2)\n"
            "        k = k.view(shape).transpose(1, 2)\n"
            "        v = v.view(shape).transpose(1, 2)\n",
            SIZED_VIEWS,
        )
        .replace(
            "    def __init__(self, config, layer_idx):\n        super().__init__()\n        self.config = config\n",
            '    def __init__(self, config, layer_idx, kind="far"):\n        super().__init__()\n        self.config = config\n'
            + banded,
            1,
        )
    )
    assert "_score_mix" in source and "self.tri" in source and "_heads_of" in source
    return source


def _convert(monkeypatch, source):
    rules = load_rules()
    monkeypatch.setattr("tests.converter.snippets.load_rules", lambda: rules)
    return prepare(source, through="prune")


def test_helper_core_inlined_with_banded_window(monkeypatch):
    module, ctx = _convert(monkeypatch, _source())
    assert ctx.eager_attention and ctx.attention_classes == ["TinyAttention"]
    attn = code_of(module, "TinyAttention")
    forward = attn.split("def forward")[1].split("    def ")[0]
    assert "_score_mix" not in forward and "softmax" not in forward and "self.tri" not in forward
    assert "mixed = self.attn(q.transpose(1, 2)[0], k.transpose(1, 2)[0]" in forward
    assert "return attn_output, None" in forward
    # heads from the helper's size()[:-1] + (count, size) view, bound to the call's arguments
    assert (
        "self.attn = PagedAttention(self.n_heads, self.head_size, self.scaling, "
        'sliding_window=config.reach if kind == "near" else None)' in attn
    )


def test_plain_causal_buffer_has_no_window(monkeypatch):
    banded = BANDED.replace(
        '        if kind == "near":\n'
        "            tri = torch.bitwise_xor(tri, torch.tril(tri, -config.reach))\n",
        "",
    )
    module, _ = _convert(monkeypatch, _source(banded))
    assert "self.attn = PagedAttention(self.n_heads, self.head_size, self.scaling)" in code_of(
        module, "TinyAttention"
    )


def test_other_mask_buffer_is_refused(monkeypatch):
    banded = BANDED.replace(
        "torch.tril(torch.ones((64, 64), dtype=bool))", "torch.ones((64, 64), dtype=bool)"
    )
    with pytest.raises(
        ConversionError, match=r"reads the buffer self.tri, which is not a causal mask"
    ):
        _convert(monkeypatch, _source(banded))


def test_helper_that_clobbers_a_later_read_is_refused(monkeypatch):
    # the helper binds n_q; the forward reads its own n_q after the call
    source = (
        _source()
        .replace(
            "        return attn_output, weights\n", "        return attn_output + n_q, weights\n"
        )
        .replace(
            "        mixed, weights = self._score_mix(",
            "        n_q = 0\n        mixed, weights = self._score_mix(",
        )
    )
    with pytest.raises(
        ConversionError, match=r"cannot inline the attention helper _score_mix: it binds \['n_q'\]"
    ):
        _convert(monkeypatch, source)


def test_function_form_baddbmm_reads_q_second(monkeypatch):
    source = _source().replace(
        "        raw = torch.matmul(qq, kk.transpose(-1, -2)) * self.scaling\n",
        "        zeros = torch.zeros(qq.shape[:-1] + (kk.shape[-2],))\n"
        "        raw = torch.baddbmm(zeros, qq, kk.transpose(-1, -2), beta=1.0, alpha=self.scaling)\n",
    )
    module, _ = _convert(monkeypatch, source)
    attn = code_of(module, "TinyAttention")
    assert "mixed = self.attn(q.transpose(1, 2)[0]" in attn  # not the zeros
    assert "PagedAttention(self.n_heads, self.head_size, self.scaling," in attn


def test_tidy_drops_the_inlined_helper(monkeypatch):
    module, ctx = _convert(monkeypatch, _source())
    assert "def _score_mix" in code_of(module, "TinyAttention")  # select kept it
    attn = code_of(tidy.run(module, ctx), "TinyAttention")
    assert "def _score_mix" not in attn  # nothing calls it after the rewrite
    assert "def _heads_of" in attn and "def forward" in attn and "def __init__" in attn


def test_tidy_drops_the_mask_buffer_the_core_read(monkeypatch):
    # self.tri was read only by the inlined core; a non-persistent buffer nothing reads
    # any more goes with the locals that built it. A buffer the source never read itself
    # (transformers' own code may, e.g. rope's original_inv_freq) stays.
    source = _source().replace(
        "        self.tri = nn.Buffer(tri, persistent=False)\n",
        "        self.tri = nn.Buffer(tri, persistent=False)\n"
        "        self.spare = nn.Buffer(torch.ones(2), persistent=False)\n",
    )
    module, ctx = _convert(monkeypatch, source)
    init = code_of(tidy.run(module, ctx), "TinyAttention").split("def forward")[0]
    assert "self.tri" not in init and "torch.tril" not in init and "bitwise_xor" not in init
    assert "self.spare = nn.Buffer(torch.ones(2), persistent=False)" in init
    assert "self.attn = PagedAttention(" in init


def test_helper_local_rebound_by_the_forward_is_no_clobber(monkeypatch):
    # the forward binds n_q itself after the call before reading it: inlining is safe
    source = _source().replace(
        "        return attn_output, weights\n",
        "        n_q = 1\n        return attn_output + n_q, weights\n",
    )
    module, _ = _convert(monkeypatch, source)
    forward = code_of(module, "TinyAttention").split("def forward")[1].split("    def ")[0]
    assert "mixed = self.attn(" in forward and "_score_mix" not in forward
    assert "        n_q = 1\n        return attn_output + n_q, None" in forward
