"""tp: projections whose tensor-parallel style the config picks at build time (rules
tp_plan cases, converter/passes/tp/cases.py): one layer per case in a conditional expression, a
`shard_heads` flag that head counts, per-head tensors and the row-parallel consumer read."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import libcst as cst
import pytest
from hypothesis import given
from hypothesis import strategies as st

from converter.analysis import analyze
from converter.context import ConversionContext
from converter.errors import ConversionError
from converter.passes import tp
from converter.passes.tp.cases import parse_cases, sharded_test
from converter.passes.tp.switch import InlineLater, attr_values
from converter.pipeline import load_rules

# A fused projection in a layout a flag picks; the group count is set after the projection.
SOURCE = """
import torch
from torch import nn
from runtime.attention import PagedAttention


class Mixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_q = config.n_q
        self.hd = config.width // config.n_q
        self.blend = nn.Linear(config.width, (config.n_grp * 2 + config.n_q) * self.hd, bias=config.use_bias)
        self.packed = config.packed
        self.fold = nn.Linear(config.width, config.width, bias=config.use_bias)
        self.n_grp = config.n_grp if self.packed else 1
        self.sink_logits = nn.Parameter(torch.zeros(config.n_q))
        self.attn = PagedAttention(self.n_q, self.hd, 1.0, num_kv_heads=self.n_grp, alibi=Alibi(torch.ones(config.n_q), scale=0.5) if config.slopes else None)

    def forward(self, x, kv_cache, input_metadata):
        interface = ALL_ATTENTION_FUNCTIONS.get_interface("eager", None)
        y = self.blend(x).view(1, -1, self.n_grp, self.n_q // self.n_grp + 2, self.hd)
        q, k, v = y[..., :-2, :], y[..., -2, :], y[..., -1, :]
        out = self.attn(q.flatten(-2), k, v, kv_cache, input_metadata, sinks=self.sink_logits)
        return self.fold(out)


class Stage(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mixer = Mixer(config)

    def forward(self, h, kv_cache, input_metadata):
        return h + self.mixer(h, kv_cache, input_metadata)


class Trunk(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.stages = nn.ModuleList([Stage(config) for _ in range(config.depth)])

    def forward(self, input_ids, positions, kv_caches, input_metadata):
        h = self.tok(input_ids)
        for i, stage in enumerate(self.stages):
            h = stage(h, kv_caches[i], input_metadata)
        return h


class TrunkForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, input_metadata):
        return self.model(input_ids, positions, kv_caches, input_metadata)
"""

CASES = [
    {"style": "colwise", "when": {"packed": True}, "tp_divides": "n_grp"},
    {"style": "colwise_qkv", "when": {"packed": False}, "tp_divides": "n_q"},
    {"style": "colwise_gather_output"},
]
PLAN = {"stages.*.mixer.blend": CASES, "stages.*.mixer.fold": "rowwise_split_input"}


def convert(source: str = SOURCE, plan: dict | None = None):
    module = cst.parse_module(source)
    ctx = ConversionContext.from_source(
        source, "modeling_trunk.py", "trunk", "transformers.models.trunk"
    )
    rules = load_rules()
    ctx.rules = {**rules, "architectures": {"trunk": {"tp_plan": plan or PLAN}}}
    ctx.base_model_prefix = "model"
    analyze(module, ctx)
    return " ".join(tp.run(module, ctx).code.split()), ctx


def test_one_layer_per_case_in_a_conditional_expression():
    code, ctx = convert()
    column = "ColumnParallelLinear(config.width, (config.n_grp * 2 + config.n_q) * self.hd, bias=config.use_bias"
    # the KV head count `self.n_grp` is assigned only after the projection: its value,
    # with `self.packed` (also assigned later) inlined in turn
    qkv = "QKVParallelLinear(config.width, self.hd, self.n_q, (config.n_grp if config.packed else 1), bias=config.use_bias)"
    assert (
        f"self.blend = ({column}) if config.packed and config.n_grp % get_tp_size() == 0 "
        f"else {qkv} if not config.packed and config.n_q % get_tp_size() == 0 "
        f"else {column}, gather_output=True))"
    ) in code
    assert ctx.tp_decisions["Mixer.blend"].startswith("conditional (rules/architectures.toml")


def test_flag_before_its_first_reader_and_read_by_the_consumer():
    code, _ = convert()
    flag = (
        "self.shard_heads = (config.packed and config.n_grp % get_tp_size() == 0) or "
        "(not config.packed and config.n_q % get_tp_size() == 0)"
    )
    assert flag in code
    assert code.index("self.blend = (") < code.index(flag) < code.index("self.fold =")
    assert "bias=config.use_bias, input_is_parallel=self.shard_heads)" in code
    assert "from runtime.parallel import" in code and "get_tp_size" in code


def test_head_counts_and_per_head_tensors_follow_the_flag():
    code, _ = convert()
    assert (
        "PagedAttention(local_num_heads(self.n_q, self.shard_heads), self.hd, 1.0, "
        "num_kv_heads=local_num_kv_heads(self.n_grp, self.shard_heads), "
        "alibi=Alibi(local_head_block(torch.ones(config.n_q), self.shard_heads), scale=0.5) "
        "if config.slopes else None)"
    ) in code
    assert (
        "view(1, -1, local_num_kv_heads(self.n_grp, self.shard_heads), "
        "local_num_heads(self.n_q, self.shard_heads) // local_num_kv_heads(self.n_grp, self.shard_heads) + 2, self.hd)"
    ) in code
    assert "sinks=local_head_block(self.sink_logits, self.shard_heads)" in code


def test_flag_name_avoids_the_class_own_attributes():
    source = SOURCE.replace(
        "self.packed = config.packed", "self.packed = config.packed\n        self.shard_heads = 3"
    )
    code, _ = convert(source)
    assert "self.shard_heads_ = (config.packed" in code
    assert "local_num_heads(self.n_q, self.shard_heads_)" in code


def test_two_projections_sharding_under_different_conditions_is_an_error():
    plan = {
        **PLAN,
        "stages.*.mixer.fold": [
            {"style": "colwise", "when": {"packed": True}},
            {"style": "colwise_gather_output"},
        ],
    }
    with pytest.raises(
        ConversionError, match="Mixer: tp_plan cases must shard its heads under one"
    ):
        convert(plan=plan)


@pytest.mark.parametrize(
    "entry,message",
    [
        ([{"style": "colwise", "when": {"a": True}}], "must be a list of"),  # no fallback
        ([{"style": "rowwise", "when": {"a": True}}, {"style": "colwise"}], "'rowwise' is not"),
        ([], "must be a list of"),
        ([["colwise", "config.a"], ["colwise"]], "must be a list of"),  # code, not data
        ([{"style": "colwise", "when": {"a.b": True}}, {"style": "colwise"}], "config fields"),
        ([{"style": "colwise", "tp_divides": "n % 2"}, {"style": "colwise"}], "names a config"),
    ],
)
def test_malformed_cases_are_one_line_errors(entry, message):
    with pytest.raises(ConversionError, match=message):
        convert(plan={**PLAN, "stages.*.mixer.blend": entry})
    with pytest.raises(ValueError, match=message):
        parse_cases(entry)


def test_inline_later_is_recursive_and_terminates():
    init = cst.parse_module(
        "def __init__(self, c):\n    self.m = c.flag\n    self.k = c.n if self.m else 1\n"
        "    self.a = self.b + 1\n    self.b = self.a * 2\n"
    ).body[0]
    values = attr_values(init)

    def inline(text: str, seen: set[str]) -> str:
        node = cst.parse_expression(text).visit(InlineLater(values, seen))
        return cst.Module([]).code_for_node(node)

    assert inline("self.k + self.z", set()) == "(c.n if c.flag else 1) + self.z"
    assert inline("self.k", {"k"}) == "self.k"  # assigned already: read as is
    assert inline("self.b", set()) == "((self.b + 1) * 2)"  # a cycle stops where it closes


STYLES = st.sampled_from(["colwise", "colwise_qkv", "colwise_gather_output"])


@given(st.lists(STYLES, min_size=1, max_size=5))
def test_sharded_test_is_the_first_true_case(styles):
    """Over every truth assignment of the cases' tests, the flag is "the case picked
    (first true test, else the last) is not gathered"."""
    names = [f"c{i}" for i in range(len(styles) - 1)]
    entries = [{"style": s, "when": {n: True}} for s, n in zip(styles, names)]
    cases = parse_cases([*entries, {"style": styles[-1]}])
    text = cst.Module([]).code_for_node(sharded_test(cases, cst.Name("config")))
    for values in itertools.product([False, True], repeat=len(names)):
        config = SimpleNamespace(**dict(zip(names, values)))
        picked = next((s for s, n in zip(styles, names) if getattr(config, n)), styles[-1])
        assert eval(text, {}, {"config": config}) == (picked != "colwise_gather_output"), text


def test_splits_of_a_maybe_qkv_output_take_the_layer_sizes_when_it_is_one():
    """A fused output split into q | k | v directly (through unsqueeze) gets the
    QKVParallelLinear's local sizes when the config builds one; a split after a view cuts
    heads, not the fused output, and stays."""
    source = SOURCE.replace(
        "        q, k, v = y[..., :-2, :], y[..., -2, :], y[..., -1, :]",
        "        q, k, v = self.blend(x).unsqueeze(0).split((cfg_q, cfg_kv, cfg_kv), dim=-1)\n"
        "        q, k, v = y.split([self.hd] * 3, dim=-1)",
    )
    code, _ = convert(source)
    assert (
        ".unsqueeze(0).split([self.blend.q_size, self.blend.kv_size, self.blend.kv_size] "
        "if isinstance(self.blend, QKVParallelLinear) else (cfg_q, cfg_kv, cfg_kv), dim=-1)"
    ) in code
    assert "y.split([self.hd] * 3, dim=-1)" in code
    no_qkv = {**PLAN, "stages.*.mixer.blend": [CASES[0], CASES[2]]}
    assert "isinstance(" not in convert(source, no_qkv)[0]


def test_case_tests_are_built_from_data():
    """`when` values: true / false / anything else (an equality); `tp_divides`: the TP
    size divides a config field."""
    (case, _) = parse_cases(
        [
            {
                "style": "colwise",
                "when": {"a": True, "b": False, "kind": "mqa", "n": 2},
                "tp_divides": "h",
            },
            {"style": "colwise_gather_output"},
        ]
    )
    text = cst.Module([]).code_for_node(case.test(cst.parse_expression("self.config")))
    assert text == (
        "self.config.a and not self.config.b and self.config.kind == 'mqa' and "
        "self.config.n == 2 and self.config.h % get_tp_size() == 0"
    )
    assert case.runtime_names == {"get_tp_size"}
