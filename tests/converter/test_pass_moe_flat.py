"""Stage moe, experts held as 2-D parameters their own loop views per expert (DBRX's
layout, flat_experts.py): one FusedMoE with the layout read from the loop's views and
the expert computation, the checkpoint tensors mapped by FlatExperts shard ids; a loop
FusedMoE does not compute stops with one line. Odd names on purpose (`math`, `a/b/c`,
`fn`): nothing is found by name."""

from __future__ import annotations

import pytest
from snippets import code_of, prepare
from test_pass_moe import _error, moe_source

# the computation module (its own __init__ parameters: `count` experts) and the loop
FLAT = """
class TinyMath(nn.Module):
    def __init__(self, config, count):
        super().__init__()
        self.a = nn.Parameter(torch.empty(count * config.moe_intermediate_size, config.hidden_size))
        self.b = nn.Parameter(torch.empty(count * config.moe_intermediate_size, config.hidden_size))
        self.c = nn.Parameter(torch.empty({c_shape}))
        self.fn = ACT2FN[config.hidden_act]

    def forward(self, tokens, wa, wb, wc):
{compute}


class TinyExperts(nn.Module):
    def __init__(self, config, width=None):
        super().__init__()
        self.n = config.num_local_experts
        self.inner = config.moe_intermediate_size
        self.hidden = config.hidden_size
        self.math = TinyMath(config, self.n)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        lead = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(-1, self.hidden)
        acc = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.n).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        per_expert = (-1, self.inner, self.hidden)
        for e in hit:
            e = e[0]
            slot, token = torch.where(mask[e])
            wa = self.math.a.view(per_expert)[e]
            wb = self.math.b.view(per_expert)[e]
            wc = self.math.c.view({c_view})[e]
            out = self.math(hidden_states[token], wa, wb, wc)
            out = {scale}
            acc.index_add_(0, token, out)
        {ret}
"""

NORMAL = dict(
    c_shape="count * config.moe_intermediate_size, config.hidden_size",
    c_view="per_expert",
    compute="        left = self.fn(tokens.matmul(wa.T))\n        right = tokens @ wb.t()\n"
    "        return (left * right).matmul(wc)",
    scale="out * top_k_weights[token, slot, None]",
    ret="acc = acc.view(lead, -1, self.hidden)\n        return acc",
)


def flat_source(**changes) -> str:
    """test_pass_moe's model with its decorated 3-D experts class swapped for FLAT."""
    source = moe_source()
    start = source.index("@use_experts_implementation\nclass TinyExperts")
    end = source.index("class TinyRouter")
    return source[:start] + FLAT.format(**dict(NORMAL, **changes)).lstrip() + "\n\n" + source[end:]


def test_flat_experts_become_one_fused_moe():
    module, ctx = prepare(flat_source(), through="moe")
    moe = " ".join(code_of(module, "TinyMoe").split())
    # sizes in the construction site's terms: the count through TinyMath(config, self.n)
    assert (
        "self.routed = FusedMoE( config.num_local_experts, config.hidden_size, "
        "config.moe_intermediate_size, activation=config.hidden_act, )"
        in moe
        or "self.routed = FusedMoE(config.num_local_experts, config.hidden_size, "
        "config.moe_intermediate_size, activation=config.hidden_act)"
        in moe
    ), moe
    assert "class TinyExperts" not in module.code
    assert ctx.log[-1] == "moe: TinyExperts -> FusedMoE"
    # gate (the activated factor) and up: parts 0 and 1 of gate_up, used as x @ w.T;
    # down used as x @ w: its view is [in, out]
    assert ctx.expert_checkpoint == [
        ("routed.down_proj", "routed.math.c", "FlatExperts(0, 1, transposed=True)"),
        ("routed.gate_up_proj", "routed.math.a", "FlatExperts(0, 2)"),
        ("routed.gate_up_proj", "routed.math.b", "FlatExperts(1, 2)"),
    ]


def test_roles_follow_the_dataflow_not_the_order():
    """The activated product is the gate wherever it sits; F.linear is x @ w.T; a down
    view of [out, in] (x @ w.T) is not transposed; an activation called as a function."""
    compute = (
        "        up = torch.nn.functional.linear(tokens, wa)\n"
        "        gate = torch.nn.functional.silu(torch.matmul(tokens, wb.transpose(0, 1)))\n"
        "        return torch.matmul(up * gate, wc.T)"
    )
    module, ctx = prepare(
        flat_source(
            compute=compute,
            c_shape="count * config.hidden_size, config.moe_intermediate_size",
            c_view="(-1, self.hidden, self.inner)",
        ),
        through="moe",
    )
    assert 'activation="silu"' in code_of(module, "TinyMoe")
    assert ctx.expert_checkpoint == [
        ("routed.down_proj", "routed.math.c", "FlatExperts(0, 1)"),
        ("routed.gate_up_proj", "routed.math.b", "FlatExperts(0, 2)"),
        ("routed.gate_up_proj", "routed.math.a", "FlatExperts(1, 2)"),
    ]


def test_the_generated_table_loads_through_flat_experts():
    module, _ = prepare(flat_source(), through="weights")
    lm = " ".join(code_of(module, "TinyForCausalLM").split())
    assert '(".routed.gate_up_proj", ".routed.math.a", FlatExperts(0, 2))' in lm
    imports = [line for line in module.code.splitlines() if line.startswith("from runtime.moe")]
    assert any("FlatExperts" in line for line in imports), imports


@pytest.mark.parametrize(
    "changes, words",
    [
        (  # the routing weight scales the input, not the expert's output
            dict(
                scale="out * 1.0",
            ),
            "is not transformers' top-k combination",
        ),
        (  # both factors activated: not a gated activation FusedMoE computes
            dict(
                compute="        left = self.fn(tokens.matmul(wa.T))\n"
                "        right = self.fn(tokens @ wb.t())\n"
                "        return (left * right).matmul(wc)"
            ),
            "TinyMath.forward does not compute act(x @ gate) * (x @ up) @ down",
        ),
        (  # a bias added inside the computation
            dict(
                compute="        left = self.fn(tokens.matmul(wa.T) + 1)\n"
                "        return (left * (tokens @ wb.t())).matmul(wc)"
            ),
            "does not compute act(x @ gate)",
        ),
        (  # the down view disagrees with the others on the intermediate size
            dict(
                c_shape="count * config.hidden_size, config.hidden_size",
                c_view="(-1, self.hidden, self.hidden)",
            ),
            "the expert weights disagree on the",
        ),
        (  # the declared rows are not experts * the viewed rows
            dict(c_shape="config.moe_intermediate_size, config.hidden_size"),
            "the expert count is not a factor of the declared shape",
        ),
        (  # flattened and returned flat: FusedMoE would hand back the input's shape
            dict(ret="return acc"),
            "is not transformers' top-k combination",
        ),
    ],
)
def test_loops_fused_moe_does_not_compute_stop(changes, words):
    assert words in _error(flat_source(**changes))
