"""Stage moe: experts classes found by structure become one FusedMoE where they were built,
with the layout read from the source; anything FusedMoE cannot stand for stops with one
line. Snippets use unusual names (`routed`, `n`, `inner`) so nothing is found by name."""

from __future__ import annotations

import pytest
from snippets import TINY, code_of, prepare

from converter.errors import ConversionError

EXPERTS = """
@use_experts_implementation{flags}
class TinyExperts(nn.Module):
    def __init__(self, config, width=None):
        super().__init__()
        self.n = config.num_local_experts
        self.inner = config.moe_intermediate_size if width is None else width
        self.gate_up_proj = nn.Parameter(torch.empty({gate_up}))
        self.down_proj = nn.Parameter(torch.empty({down}))
{extra}
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states
{gate}

class TinyRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, x):
        scores = torch.nn.functional.linear(x, self.weight).softmax(dim=-1)
        weights, index = torch.topk(scores, self.k, dim=-1)
        return weights, index


class TinyMoe(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = TinyRouter(config)
        self.routed = TinyExperts(config, width=config.expert_width)

    def forward(self, x):
        flat = x.view(-1, x.shape[-1])
        weights, index = self.router(flat)
        {call}
        return out.view(x.shape)


class TinyBlock(GradientCheckpointingLayer):"""

NORMAL = dict(
    flags="",
    gate_up="self.n, 2 * self.inner, config.hidden_size",
    down="self.n, config.hidden_size, self.inner",
    extra="        self.act_fn = ACT2FN[config.hidden_act]\n",
    gate="",
    call="out = self.routed(flat, top_k_weights=weights, top_k_index=index)",
)

GPT_OSS_GATE = """
    def _apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu
"""


def moe_source(**changes) -> str:
    parts = dict(NORMAL, **changes)
    source = TINY.replace("class TinyBlock(GradientCheckpointingLayer):", EXPERTS.format(**parts))
    source = source.replace(
        "from .configuration_tiny import TinyConfig",
        "from .configuration_tiny import TinyConfig\nfrom ...activations import ACT2FN\n"
        "from ...integrations import use_experts_implementation",
    )
    source = source.replace(
        "        self.ln = TinyNorm(config.hidden_size)\n",
        "        self.ln = TinyNorm(config.hidden_size)\n        self.ffn = TinyMoe(config)\n",
    )
    return source.replace(
        "        return double(residual + hidden_states)",
        "        return double(residual + self.ffn(hidden_states))",
    )


def test_experts_become_one_fused_moe_where_they_were_built():
    module, ctx = prepare(moe_source(), through="moe")
    moe = code_of(module, "TinyMoe")
    assert "self.routed = FusedMoE(" in moe
    assert "class TinyExperts" not in module.code  # the experts class goes
    assert "from runtime.moe import FusedMoE" in module.code
    # keyword arguments become positional in the experts forward's order
    assert "out = self.routed(flat, index, weights)" in moe
    assert ctx.log[-1] == "moe: TinyExperts -> FusedMoE"
    # the router stays the source's code
    assert "torch.topk(scores, self.k, dim=-1)" in code_of(module, "TinyRouter")


def test_sizes_bind_to_the_construction_arguments():
    # sizes from the parameter shapes, the experts' `width` parameter bound to the call's
    # keyword; left at its None default, the conditional folds to the config's size
    module, _ = prepare(moe_source(), through="moe")
    moe = " ".join(code_of(module, "TinyMoe").split())
    assert "FusedMoE(config.num_local_experts, config.hidden_size, (" in moe
    assert (
        "config.moe_intermediate_size if config.expert_width is None else config.expert_width"
        in moe
    )
    assert "activation=config.hidden_act" in moe
    source = moe_source().replace(
        "TinyExperts(config, width=config.expert_width)", "TinyExperts(config)"
    )
    module, _ = prepare(source, through="moe")
    moe = " ".join(code_of(module, "TinyMoe").split())
    assert "config.hidden_size, config.moe_intermediate_size, activation" in moe


def test_gpt_oss_layout_and_clamped_swiglu():
    source = moe_source(
        flags="(is_concatenated=False, is_transposed=True, has_bias=True)",
        gate_up="self.n, config.hidden_size, 2 * self.inner",
        down="(self.n, self.inner, config.hidden_size)",
        extra="        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.n, 2 * self.inner))\n"
        "        self.down_proj_bias = nn.Parameter(torch.empty(self.n, config.hidden_size))\n"
        "        self.alpha = config.swiglu_alpha\n        self.limit = config.swiglu_limit\n",
        gate=GPT_OSS_GATE,
    )
    module, _ = prepare(source, through="moe")
    moe = " ".join(code_of(module, "TinyMoe").split())
    for part in (
        'activation="silu"',
        "is_concatenated=False",
        "is_transposed=True",
        "has_bias=True",
        "alpha=config.swiglu_alpha",
        "limit=config.swiglu_limit",
        "up_offset=1.0",
    ):
        assert part in moe, part


@pytest.mark.parametrize(
    "gate, expected",
    [
        (  # DeepSeek-V4: clamp before the activation
            "gate, up = gate_up.chunk(2, dim=-1)\n        gate = gate.clamp(max=self.limit)\n"
            "        up = up.clamp(min=-self.limit, max=self.limit)\n"
            "        return self.act_fn(gate) * up",
            ["activation=config.hidden_act", "limit=config.swiglu_limit"],
        ),
        (  # Step-3.7: the clamp after the activation
            "gate, up = gate_up.chunk(2, dim=-1)\n"
            "        up = up.clamp(min=-self.limit, max=self.limit)\n"
            "        return self.act_fn(gate).clamp(max=self.limit) * up",
            ["limit=config.swiglu_limit", "limit_after_activation=True"],
        ),
        (  # Beam: the default gate in fp32 (precision casts are the identity here)
            "gate, up = gate_up.chunk(2, dim=-1)\n"
            "        return (self.act_fn(gate.float()) * up.float()).to(gate.dtype)",
            ["activation=config.hidden_act"],
        ),
    ],
)
def test_own_apply_gate_forms(gate, expected):
    source = moe_source(
        extra=NORMAL["extra"] + "        self.limit = config.swiglu_limit\n",
        gate=f"\n    def _apply_gate(self, gate_up):\n        {gate}\n",
    )
    module, _ = prepare(source, through="moe")
    moe = " ".join(code_of(module, "TinyMoe").split())
    for part in expected:
        assert part in moe, part
    if "limit" not in " ".join(expected):
        assert "limit" not in moe


def _error(source: str) -> str:
    with pytest.raises(ConversionError) as info:
        prepare(source, through="moe")
    message = str(info.value)
    assert "\n" not in message and message.startswith("modeling_tiny.py:")
    return message


@pytest.mark.parametrize(
    "changes, words",
    [
        (  # the decorator says transposed, the shapes say not
            dict(flags="(is_transposed=True)"),
            "is_transposed=True but gate_up_proj's shape says False",
        ),
        (  # a clamp on the gate only: FusedMoE clamps both halves by one limit
            dict(
                extra=NORMAL["extra"] + "        self.limit = config.swiglu_limit\n",
                gate="\n    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n"
                "        return self.act_fn(gate.clamp(max=self.limit)) * up\n",
            ),
            "gate and up must be clamped by the same limit",
        ),
        (  # a post-expert norm
            dict(flags="(has_post_expert_norm=True)"),
            "has_post_expert_norm",
        ),
        (  # a parameter FusedMoE does not hold
            dict(extra=NORMAL["extra"] + "        self.scale = nn.Parameter(torch.ones(self.n))\n"),
            "holds parameters ['down_proj', 'gate_up_proj', 'scale']",
        ),
        (  # an activation module of its own
            dict(extra="        self.act_fn = TinyNorm(config.hidden_size)\n"),
            "TinyExperts.act_fn (TinyNorm) has no place in FusedMoE",
        ),
        (  # called densely, not with the top-k routing
            dict(call="out = self.routed(flat)"),
            "experts class TinyExperts is called as `self.routed(flat)`",
        ),
        (  # a layout flag that is not a literal
            dict(flags="(is_transposed=TRANSPOSED)"),
            "is not a literal layout flag",
        ),
    ],
)
def test_unknown_layouts_stop_with_one_line(changes, words):
    assert words in _error(moe_source(**changes))


def test_undecorated_experts_found_by_structure_stop():
    # 3-D parameters, called as experts(...), no decorator: found, and refused with
    # the reason (its forward is not transformers' top-k loop: test_moe_topk_loop.py)
    message = _error(moe_source(flags="").replace("@use_experts_implementation\n", ""))
    assert "TinyExperts holds 3-D expert parameters without transformers' experts" in message
    assert "has 0 for loops, not one over experts" in message


def test_experts_without_3d_parameters_stop():
    """An experts module routing by a one-hot mask over 2-D weights it never views per
    expert (test_pass_moe_flat.py: the ones that do)."""
    source = moe_source().replace(
        "    def forward(self, hidden_states, top_k_index, top_k_weights):\n        return hidden_states\n",
        "    def forward(self, hidden_states, top_k_index, top_k_weights):\n"
        "        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.n)\n"
        "        return hidden_states * mask.sum()\n",
    )
    source = source.replace("@use_experts_implementation\n", "")
    source = source.replace(
        "torch.empty(self.n, 2 * self.inner, config.hidden_size)",
        "torch.empty(self.n * self.inner, config.hidden_size)",
    )
    source = source.replace(
        "torch.empty(self.n, config.hidden_size, self.inner)",
        "torch.empty(self.n * self.inner, config.hidden_size)",
    )
    message = _error(source)
    assert "TinyExperts holds no 3-D expert parameters and views no parameter per expert" in message


def test_conditional_block_keeps_both_forwards():
    """`self.mlp = Moe(config) if sparse else Mlp(config)`: both classes' forwards stay
    live (the ownership graph's alternatives), and both are tensor-parallel."""
    source = moe_source().replace(
        "        self.ffn = TinyMoe(config)\n",
        "        self.ffn = TinyMoe(config) if layer_idx % 2 else TinyDense(config)\n",
    )
    source = source.replace(
        "class TinyMoe(nn.Module):",
        "class TinyDense(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
        "        self.up_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size)\n"
        "        self.down_proj = nn.Linear(4 * config.hidden_size, config.hidden_size)\n\n"
        "    def forward(self, x):\n        return self.down_proj(torch.relu(self.up_proj(x)))\n\n\n"
        "class TinyMoe(nn.Module):",
    )
    module, _ = prepare(source, through="tp")
    dense = code_of(module, "TinyDense")
    assert "def forward(self, x)" in dense
    assert "ColumnParallelLinear" in dense and "RowParallelLinear" in dense
    assert "def forward(self, x)" in code_of(module, "TinyMoe")
