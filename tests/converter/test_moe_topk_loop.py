"""Stage moe: an experts class without transformers' decorator whose forward is its
top-k loop written out (LongCat-Flash's) becomes FusedMoE; its zero-computation experts
(ids from the routed count on, returning their input) become ``identity_experts=``.
Any other forward stops with one line. Unusual names (`routed`, `n`, `spare`, `inner`,
`passthru`) so nothing is found by name."""

from __future__ import annotations

import pytest
from snippets import code_of, prepare
from test_pass_moe import _error, moe_source

LOOP = """    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        if top_k_index.numel() == 0:
            return final
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.total).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero(as_tuple=False)
        for e_t in hit:
            e = int(e_t.item())
            pos, tok = torch.where(mask[e].squeeze(0))
            if tok.numel() == 0:
                continue
            x = hidden_states[tok]
            if e >= self.n or self.gate_up_proj is None:
                y = self.passthru(x)
            else:
                gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                y = self.act_fn(gate) * up
                y = F.linear(y, self.down_proj[e])
            y = y * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, y.to(hidden_states.dtype))
        return final
"""
ZERO = dict(
    flags="",
    gate_up="self.total, 2 * self.inner, config.hidden_size",
    down="self.n, config.hidden_size, self.inner",
    extra="        self.act_fn = ACT2FN[config.hidden_act]\n"
    "        self.passthru = nn.Identity()\n",
)


def zero_source(**changes) -> str:
    source = moe_source(**dict(ZERO, **changes)).replace("@use_experts_implementation\n", "")
    source = source.replace(
        "    def forward(self, hidden_states, top_k_index, top_k_weights):\n"
        "        return hidden_states\n",
        LOOP,
    )
    # the model's zero experts: their count beside the routed ones, and optional weights
    source = source.replace(
        "        self.n = config.num_local_experts\n",
        "        self.n = config.num_local_experts\n"
        "        self.spare = config.zero_expert_num or 0\n"
        "        self.total = self.n + self.spare\n",
    )
    return source.replace(
        "        self.gate_up_proj = nn.Parameter(",
        "        if self.n > 0:\n            self.gate_up_proj = nn.Parameter(",
    ).replace(
        "        self.down_proj = nn.Parameter(torch.empty(self.n, config.hidden_size, self.inner))\n",
        "            self.down_proj = nn.Parameter(torch.empty(self.n, config.hidden_size, self.inner))\n"
        "        else:\n"
        '            self.register_parameter("gate_up_proj", None)\n'
        '            self.register_parameter("down_proj", None)\n',
    )


def test_the_written_out_loop_with_zero_experts_becomes_fused_moe():
    module, ctx = prepare(zero_source(), through="moe")
    moe = " ".join(code_of(module, "TinyMoe").split())
    assert "self.routed = FusedMoE(config.num_local_experts, config.hidden_size," in moe
    assert "identity_experts=(config.zero_expert_num or 0)" in moe
    assert "class TinyExperts" not in module.code
    assert ctx.log[-1] == "moe: TinyExperts -> FusedMoE"


def test_zero_experts_returning_their_input_directly():
    module, _ = prepare(zero_source().replace("y = self.passthru(x)", "y = x"), through="moe")
    assert "identity_experts=(config.zero_expert_num or 0)" in code_of(module, "TinyMoe")


def test_the_loop_without_zero_experts():
    source = zero_source(gate_up="self.n, 2 * self.inner, config.hidden_size").replace(
        "            if e >= self.n or self.gate_up_proj is None:\n"
        "                y = self.passthru(x)\n"
        "            else:\n"
        "                gate, up",
        "            if True:\n                gate, up",
    )
    module, _ = prepare(
        source.replace("        self.passthru = nn.Identity()\n", ""), through="moe"
    )
    moe = code_of(module, "TinyMoe")
    assert "FusedMoE(" in moe and "identity_experts" not in moe


@pytest.mark.parametrize(
    "old, new, words",
    [
        (  # a scale FusedMoE would drop (reading a size of the class is allowed)
            "y = F.linear(y, self.down_proj[e])",
            "y = F.linear(y, self.down_proj[e]) * self.inner",
            "computes `F.linear(y, self.down_proj[e]) * self.inner`",
        ),
        (
            "y = F.linear(y, self.down_proj[e])",
            "y = F.linear(y, self.down_proj[e]) * self.scale[e]",
            "the experts forward reads self.scale",
        ),
        (
            "y = F.linear(y, self.down_proj[e])",
            "y = torch.tanh(F.linear(y, self.down_proj[e]))",
            "the experts forward calls torch.tanh",
        ),
        (
            "y = y * top_k_weights[tok, pos, None]",
            "y = y.to(x.dtype)",
            "lacks the top-k loop's * top_k_weights[...]",
        ),
        (
            "gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)",
            "up, gate = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)",
            "computes `self.act_fn(gate) * up`",
        ),
        (  # arithmetic before the loop
            "        final = torch.zeros_like(hidden_states)\n",
            "        final = torch.zeros_like(hidden_states)\n        hidden_states = -hidden_states\n",
            "computes `-hidden_states`",
        ),
        (
            "y = y * top_k_weights[tok, pos, None]",
            "y *= top_k_weights[tok, pos, None]",
            "computes `y *=",
        ),
        (  # zero experts that compute something else than their input
            "y = self.passthru(x)",
            "y = final[tok]",
            "compute `final[tok]`, not their input",
        ),
    ],
)
def test_any_other_forward_stops_with_one_line(old, new, words):
    source = zero_source()
    assert old in source
    message = _error(source.replace(old, new))
    assert "TinyExperts holds 3-D expert parameters without transformers' experts" in message
    assert words in message


def test_zero_experts_without_their_count_in_the_shapes_stop():
    message = _error(zero_source(gate_up="self.n, 2 * self.inner, config.hidden_size"))
    assert "experts from self.n on return their input" in message
    assert "do not say how many there are" in message
