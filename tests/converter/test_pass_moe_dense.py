"""Stage moe, dense experts (Llama 4's shape): every expert run on every token with its
input scaled by the token's score becomes top-k routing onto one FusedMoE with the weight
on the input, where the scores are 0 off the top-k and an expert maps zero to zero;
anything else stops with one line. Unusual names (`mixer`, `picker`, `bank`) so nothing
is found by name."""

from __future__ import annotations

import pytest
import torch
from snippets import TINY, code_of, prepare

from converter.errors import ConversionError

DENSE = """
class TinyBank(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.count = config.num_local_experts
        self.width = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(self.count, self.width, 2 * config.expert_width))
        self.down_proj = nn.Parameter(torch.empty((self.count, config.expert_width, self.width)))
        self.act_fn = ACT2FN[config.hidden_act]
{extra}
    def forward(self, hidden_states):
        \"\"\"Docstring.\"\"\"
        hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.width)
        gate_up = torch.bmm(hidden_states, self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        next_states = torch.bmm((up * self.act_fn(gate)), self.down_proj)
        next_states = next_states.view(-1, self.width)
        return next_states


class TinyPicker(nn.Linear):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        self.k = config.num_experts_per_tok

    def forward(self, hidden_states):
        logits = super().forward(hidden_states)
        top_value, top_index = torch.topk(logits, self.k, dim=1)
        {scores}
        scores = torch.nn.functional.sigmoid(scores.float()).to(scores.dtype)
        return scores, logits


class TinyMixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.bank = TinyBank(config)
        self.picker = TinyPicker(config)

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        scores, logits = self.picker(hidden_states)
        routed_in = hidden_states.repeat(scores.shape[1], 1)
        routed_in = routed_in * scores.transpose(0, 1).reshape(-1, 1)
        routed_out = self.bank(routed_in)
        out = hidden_states * 2
        {use}
        return out, logits


class TinyBlock(GradientCheckpointingLayer):"""

NORMAL = dict(
    extra="",
    scores='scores = torch.full_like(logits, float("-inf")).scatter_(1, top_index, top_value)',
    use="out.add_(routed_out.reshape(scores.shape[1], -1, routed_out.shape[-1]).sum(dim=0))",
)


def dense_source(**changes) -> str:
    parts = dict(NORMAL, **changes)
    source = TINY.replace("class TinyBlock(GradientCheckpointingLayer):", DENSE.format(**parts))
    source = source.replace(
        "from .configuration_tiny import TinyConfig",
        "from .configuration_tiny import TinyConfig\nfrom ...activations import ACT2FN",
    )
    source = source.replace(
        "        self.ln = TinyNorm(config.hidden_size)\n",
        "        self.ln = TinyNorm(config.hidden_size)\n        self.ffn = TinyMixer(config)\n",
    )
    return source.replace(
        "        return double(residual + hidden_states)",
        "        return double(residual + self.ffn(hidden_states)[0])",
    )


def test_dense_experts_become_top_k_routing_with_the_weight_on_the_input():
    module, ctx = prepare(dense_source(), through="moe")
    mixer = " ".join(code_of(module, "TinyMixer").split())
    assert (
        "self.bank = FusedMoE(config.num_local_experts, config.hidden_size, "
        "config.expert_width, activation=config.hidden_act, is_transposed=True, "
        "apply_router_weight_on_input=True)" in mixer
    )
    assert "top_k_weights, top_k_index = torch.topk(scores, self.picker.k, dim=-1)" in mixer
    assert "routed_out = self.bank(hidden_states, top_k_index, top_k_weights)" in mixer
    assert "out.add_(routed_out)" in mixer
    assert "class TinyBank" not in module.code
    assert ctx.log[-1] == "moe: TinyBank -> FusedMoE"
    # the router stays the source's code
    assert "torch.topk(logits, self.k, dim=1)" in code_of(module, "TinyPicker")


def test_the_rewrite_computes_what_the_dense_block_computes():
    """The identity the rewrite rests on, on random weights: the dense block (every
    expert on every token, input scaled by a score that is 0 off the top-k) equals
    FusedMoE over the top-k with the weight on the input."""
    from runtime.moe import FusedMoE

    torch.manual_seed(0)
    E, H, inter, k, T = 6, 16, 8, 2, 5
    w_gate_up = torch.randn(E, H, 2 * inter) * 0.3
    w_down = torch.randn(E, inter, H) * 0.3
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    top_value, top_index = torch.topk(logits, k, dim=1)
    scores = torch.full_like(logits, float("-inf")).scatter_(1, top_index, top_value).sigmoid()
    routed_in = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)
    gate, up = torch.bmm(routed_in.view(E, -1, H), w_gate_up).chunk(2, dim=-1)
    dense = torch.bmm(up * torch.nn.functional.silu(gate), w_down).view(E, -1, H).sum(dim=0)
    fused = FusedMoE(E, H, inter, is_transposed=True, apply_router_weight_on_input=True)
    fused.gate_up_proj.weight_loader(fused.gate_up_proj, w_gate_up)
    fused.down_proj.weight_loader(fused.down_proj, w_down)
    weights, index = torch.topk(scores, k, dim=-1)
    torch.testing.assert_close(fused(x, index, weights), dense, atol=1e-5, rtol=1e-5)


def test_scores_not_zero_off_the_top_k_stop():
    source = dense_source(scores="scores = logits * 1")
    with pytest.raises(ConversionError, match="not its top-k scattered into -inf"):
        prepare(source, through="moe")


def test_expert_biases_stop():
    extra = (
        "        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.count, 2 * config.expert_width))\n"
        "        self.down_proj_bias = nn.Parameter(torch.empty(self.count, self.width))\n"
    )
    with pytest.raises(ConversionError, match="has expert biases"):
        prepare(dense_source(extra=extra), through="moe")


def test_an_output_read_another_way_stops():
    source = dense_source(use="out.add_(routed_out.sum())")
    with pytest.raises(ConversionError, match="is not read once, as its expert blocks summed"):
        prepare(source, through="moe")


def test_a_forward_of_another_shape_stops():
    source = dense_source().replace(
        "gate_up = torch.bmm(hidden_states, self.gate_up_proj)",
        "gate_up = torch.bmm(hidden_states, self.gate_up_proj) + 1",
    )
    with pytest.raises(ConversionError, match="TinyBank.forward"):
        prepare(source, through="moe")


def test_an_ungated_expert_needs_an_activation_zero_at_zero():
    source = dense_source().replace(
        "self.gate_up_proj = nn.Parameter(torch.zeros(self.count, self.width, 2 * config.expert_width))",
        "self.up_proj = nn.Parameter(torch.zeros(self.count, self.width, config.expert_width))",
    )
    source = source.replace(
        "        gate_up = torch.bmm(hidden_states, self.gate_up_proj)\n"
        "        gate, up = gate_up.chunk(2, dim=-1)\n"
        "        next_states = torch.bmm((up * self.act_fn(gate)), self.down_proj)\n",
        "        up = torch.bmm(hidden_states, self.up_proj)\n"
        "        next_states = torch.bmm(self.act_fn(up), self.down_proj)\n",
    ).replace("self.gate_up_proj.shape[0]", "self.up_proj.shape[0]")
    with pytest.raises(ConversionError, match="is not known to be 0 at 0"):
        prepare(source, through="moe")
    module, _ = prepare(
        source.replace("ACT2FN[config.hidden_act]", 'ACT2FN["relu"]'), through="moe"
    )
    assert "has_gate=False" in code_of(module, "TinyMixer")
