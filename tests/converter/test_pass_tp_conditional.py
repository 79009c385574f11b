"""tp: a projection built conditionally (``None if <lora> else nn.Linear(...)``, MLA's
q_proj / q_b_proj) is sharded inside its conditional and never fused."""

from tests.converter.test_pass_tp import SNIPPET, convert

LINEAR = "nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)"


def test_conditional_linear_is_sharded_in_place():
    source = SNIPPET.replace(
        f"self.q_proj = {LINEAR}",
        f"self.q_proj = None if config.low_rank else {LINEAR}\n"
        f"        self.q_low = {LINEAR} if config.low_rank else None",
    )
    assert source != SNIPPET
    code, ctx = convert(source)
    flat = " ".join(code.split())
    parallel = (
        "ColumnParallelLinear(config.hidden_size, self.num_heads * self.head_dim, bias=False)"
    )
    assert f"self.q_proj = None if config.low_rank else {parallel}" in flat
    assert "QKVParallelLinear" not in flat  # q_proj's conditional ctor keeps it out of fusion
    assert ctx.tp_decisions["TinyAttention.q_proj"].startswith("colwise")
    # the call in the other arm is a site too (no rule names q_low: replicated)
    assert ctx.tp_decisions["TinyAttention.q_low"].startswith("replicated")
