"""eager_core on a core with no KV cache (GPT-1 style): the paged call goes where q/k/v
are final, a key stored transposed is read through its permute, a flag-guarded scale with
a run-time size read becomes a static expression, a causal buffer blended into the scores
is dropped, and a list the core returned keeps a valid tail. Names are unusual on
purpose: detection is by structure."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare

UNCACHED = """
class TinyAttention(nn.Module):
    def __init__(self, config, layer_idx, shrink=True):
        super().__init__()
        self.config = config
        self.lanes = config.num_attention_heads
        self.width = config.hidden_size
        self.shrink = shrink
        self.tri = nn.Buffer(torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64), persistent=False)
        self.fused = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def carve(self, t, flip=False):
        shape = t.size()[:-1] + (self.lanes, t.size(-1) // self.lanes)
        t = t.view(*shape)
        if flip:
            return t.permute(0, 2, 3, 1)
        else:
            return t.permute(0, 2, 1, 3)

    def glue(self, t):
        t = t.permute(0, 2, 1, 3).contiguous()
        return t.view(*t.size()[:-2], t.size(-2) * t.size(-1))

    def mix(self, aa, bb, cc, gate=None, want_probs=False):
        ss = torch.matmul(aa, bb)
        if self.shrink:
            ss = ss / math.sqrt(cc.size(-1))
        tt = self.tri[:, :, : ss.size(-2), : ss.size(-1)]
        ss = ss * tt + -1e4 * (1 - tt)
        if gate is not None:
            ss = ss + gate
        ss = nn.functional.softmax(ss, dim=-1)
        res = [torch.matmul(ss, cc)]
        if want_probs:
            res.append(ss)
        return res

    def forward(self, hidden_states, attention_mask=None, cache=None, output_attentions=False, **kwargs):
        hidden_states = self.fused(hidden_states)
        aa, bb, cc = hidden_states.split(self.width, dim=2)
        aa = self.carve(aa)
        bb = self.carve(bb, flip=True)
        cc = self.carve(cc)
        got = self.mix(aa, bb, cc, attention_mask, output_attentions)
        merged = self.glue(got[0])
        merged = self.out(merged)
        return [merged] + got[1:]


"""


def _source(core: str = UNCACHED) -> str:
    start = TINY.index("class TinyAttention")
    end = TINY.index("class TinyBlock")
    source = "import math\n" + TINY[:start] + core.lstrip("\n") + TINY[end:]
    return source.replace("hidden_states, _ = self.attn_core(", "hidden_states = self.attn_core(")


def _attention(core: str = UNCACHED) -> str:
    module, _ = prepare(_source(core), through="attention")
    return code_of(module, "TinyAttention")


def test_uncached_core_becomes_one_paged_call():
    attn = _attention()
    forward = attn.split("def forward")[1]
    # after the last statement binding q/k/v; the key is [B, H, D, T]: read through permute
    assert (
        "cc = self.carve(cc)\n        merged = self.attn(aa.transpose(1, 2)[0], "
        "bb.permute(0, 3, 1, 2)[0], cc.transpose(1, 2)[0], kv_cache, input_metadata)[None]"
    ) in forward
    for gone in ("softmax", "matmul", "self.tri", "glue", "ss"):
        assert gone not in forward, gone
    # heads and head size from the carve helper, the run-time size read made static; the
    # scale only under the constructor flag; the blended buffer is no scale factor
    assert (
        "self.attn = PagedAttention(self.lanes, self.width // self.lanes, "
        "1 / (math.sqrt(self.width // self.lanes)) if self.shrink else 1.0)"
    ) in attn
    # the probabilities were appended only under a flag fixed false: the tail is empty
    assert "return [merged]\n" in forward and "None[" not in forward


def test_key_read_transposed_in_the_product():
    core = UNCACHED.replace("torch.matmul(aa, bb)", "torch.matmul(aa, bb.transpose(-1, -2))")
    core = core.replace("bb = self.carve(bb, flip=True)", "bb = self.carve(bb)")
    forward = _attention(core).split("def forward")[1]
    assert "bb.transpose(1, 2)[0], cc.transpose(1, 2)[0]" in forward


def test_key_layout_contradicting_the_product_is_refused():
    # a bare key operand means [B, H, D, T]; this carve leaves it [B, H, T, D]
    core = UNCACHED.replace("bb = self.carve(bb, flip=True)", "bb = self.carve(bb)")
    with pytest.raises(ConversionError, match="the key bb is read as"):
        _attention(core)


def test_bare_mask_product_is_refused():
    # s * m without the blend leaves masked scores at 0, which the softmax still weighs
    core = UNCACHED.replace("ss = ss * tt + -1e4 * (1 - tt)", "ss = ss * tt")
    with pytest.raises(ConversionError, match=r"multiplies its scores by a mask \(ss \* tt\)"):
        _attention(core)


def test_non_causal_buffer_is_refused():
    core = UNCACHED.replace("torch.tril(torch.ones(64, 64))", "torch.rand(64, 64)")
    with pytest.raises(ConversionError, match="self.tri, which is not a causal mask"):
        _attention(core)


def test_scores_times_a_forward_mask_is_refused():
    # a per-call mask multiplied into the scores is no constructor-time scale
    core = UNCACHED.replace("ss = ss + gate", "ss = ss * gate")
    with pytest.raises(
        ConversionError, match=r"multiplied by forward value\(s\) \['attention_mask'\]"
    ):
        _attention(core)
