"""The TP pass reuses the source's expression nodes: an argument the source wraps over
lines (`2\\n* config.intermediate_size`, as a formatter at 40 columns leaves it) builds the
parallel layer as it does unwrapped (was an unparsable re-parse of its text)."""

from __future__ import annotations

from tests.converter.test_pass_tp import SNIPPET, convert

GATE_UP = SNIPPET.replace(
    """        self.wi = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.act = ACT2FN["gelu"]
        self.wo = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x):
        return self.wo(self.act(self.wi(x)))""",
    """        self.gate_up_proj = nn.Linear(
            config.hidden_size,
            2
            * config.intermediate_size,
            bias=False,
        )
        self.wo = nn.Linear(
            config.intermediate_size,
            config.hidden_size,
        )

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.wo(gate * up)""",
)


def test_wrapped_fused_gate_up_argument():
    code, ctx = convert(GATE_UP)
    assert (
        "self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, "
        "[config.intermediate_size, config.intermediate_size], bias=False)" in code
    )
    assert (
        "self.wo = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)"
        in code
    )


def test_wrapped_odd_factor_keeps_the_whole_expression():
    # not 2 * X: each half is (out) // 2, the source's node inside new parentheses
    code, _ = convert(
        GATE_UP.replace(
            "            2\n            * config", "            6\n            * config"
        )
    )
    flat = " ".join(code.split())
    assert "[(6 * config.intermediate_size) // 2, (6 * config.intermediate_size) // 2]" in flat


def test_wrapped_head_count_alias_is_localised():
    # `self.odd_kv = (\n config.num_key_value_heads\n)` aliases the PA ctor's KV head count
    source = SNIPPET.replace(
        "        self.attn = PagedAttention(",
        "        self.odd_kv = (\n            config.num_key_value_heads\n        )\n"
        "        self.attn = PagedAttention(",
    ).replace(
        "        k = self.k_proj(hidden_states)\n",
        "        k = self.k_proj(hidden_states).view(1, -1, self.odd_kv, self.head_dim)\n",
    )
    code, _ = convert(source)
    assert "view(1, -1, local_num_kv_heads(self.odd_kv), self.head_dim)" in code


def test_shape_code_compares_across_line_breaks():
    from converter.analysis.shape_ops import norm

    assert (
        norm("2\n    * config.odd_width") == norm("2 * config.odd_width") == "2 * config.odd_width"
    )
    assert norm("(\n    self.odd_dim\n)") == "self.odd_dim"
