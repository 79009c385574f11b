"""The TP pass on a small post-attention-pass snippet (no plan in any config: the
rules/tp.toml names and the dataflow rule decide)."""

from __future__ import annotations

import libcst as cst
import pytest

from converter.analysis import analyze
from converter.context import ConversionContext
from converter.errors import ConversionError
from converter.passes import tp
from converter.pipeline import load_rules

SNIPPET = """
import torch
from torch import nn
from runtime.attention import PagedAttention


class TinyAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.attn = PagedAttention(self.num_heads, self.head_dim, 1.0, num_kv_heads=config.num_key_value_heads)

    def forward(self, hidden_states, kv_cache, input_metadata):
        interface = ALL_ATTENTION_FUNCTIONS.get_interface("eager", None)
        q = self.q_proj(hidden_states).view(1, -1, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        out = self.attn(q[0], k[0], v[0], kv_cache, input_metadata)[None]
        return self.o_proj(out)


class TinyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wi = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.act = ACT2FN["gelu"]
        self.wo = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x):
        return self.wo(self.act(self.wi(x)))


class TinyLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = TinyAttention(config)
        self.mlp = TinyMLP(config)
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, h, kv_cache, input_metadata):
        h = h + self.self_attn(self.norm(h), kv_cache, input_metadata)
        return h + self.mlp(self.norm(h))


class TinyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([TinyLayer(config) for _ in range(config.num_hidden_layers)])
        self.project_out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids, positions, kv_caches, input_metadata):
        h = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, kv_caches[i], input_metadata)
        return self.project_out(h)


class TinyForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, input_metadata):
        return self.model(input_ids, positions, kv_caches, input_metadata)
"""


def convert(source: str = SNIPPET, override: dict | None = None):
    module = cst.parse_module(source)
    ctx = ConversionContext.from_source(
        source, "modeling_tiny.py", "tiny", "transformers.models.tiny"
    )
    ctx.rules = load_rules()
    if override:
        ctx.rules = {**ctx.rules, "architectures": {"tiny": {"tp_plan": override}}}
    ctx.base_model_prefix = "model"
    analyze(module, ctx)
    return tp.run(module, ctx).code, ctx


def test_linears_embeddings_and_head():
    code, ctx = convert()
    assert (
        "self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, config.num_key_value_heads, bias=False)"
        in code
    )
    assert "self.q_proj =" not in code and "self.k_proj =" not in code
    assert (
        "self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size, bias=False)"
        in code
    )
    assert (
        "self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=False)" in code
    )
    assert (
        "self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)" in code
    )
    assert "self.embed_positions = nn.Embedding(" in code  # position table stays replicated
    assert "self.project_out = nn.Linear(" in code  # base-model linear: replicated
    assert ctx.stacked_params == [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    ]
    assert "from runtime.parallel import" in code


def test_fused_uses_and_head_counts():
    code, _ = convert()
    assert "q_proj_out, k_proj_out, v_proj_out = self.qkv_proj(hidden_states).split(" in code
    assert "q = q_proj_out.view(1, -1, local_num_heads(self.num_heads), self.head_dim)" in code
    assert (
        "PagedAttention(local_num_heads(self.num_heads), self.head_dim, 1.0, num_kv_heads=local_num_kv_heads(config.num_key_value_heads))"
        in code
    )
    # __init__ keeps totals: the parallel layers take full sizes.
    assert "self.num_heads = config.num_attention_heads" in code


def test_dataflow_rule_pairs_unnamed_linears():
    code, ctx = convert()
    assert (
        "self.wi = ColumnParallelLinear(config.hidden_size, 4 * config.hidden_size, bias=True)"
        in code
    )
    assert (
        "self.wo = RowParallelLinear(4 * config.hidden_size, config.hidden_size, bias=True)" in code
    )
    assert ctx.tp_decisions["TinyMLP.wi"] == "colwise (dataflow)"


def test_override_wins():
    code, ctx = convert(override={"layers.*.mlp.wi": "replicated_with_grad_allreduce"})
    assert "self.wi = nn.Linear(" in code
    assert "rules/architectures.toml" in ctx.tp_decisions["TinyMLP.wi"]


def test_name_rule_contradicting_dataflow_stops():
    source = SNIPPET.replace("self.wo", "self.dense")  # tp.toml: dense is rowwise
    source = source.replace(
        "self.wi", "self.c_proj"
    )  # tp.toml: c_proj is rowwise, dataflow: colwise
    with pytest.raises(
        ConversionError,
        match="TinyMLP.c_proj: rules/tp.toml says rowwise but the dataflow rule says colwise",
    ):
        convert(source)


def test_no_fusion_when_a_member_is_called_twice():
    source = SNIPPET.replace(
        "v = self.v_proj(hidden_states)",
        "v = self.v_proj(hidden_states) + self.v_proj(hidden_states)",
    )
    code, ctx = convert(source)
    assert "QKVParallelLinear" not in code
    assert "self.q_proj = ColumnParallelLinear(" in code
    assert ctx.stacked_params == []
    assert any("not fusing" in line for line in ctx.log)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_dataflow_rule_agrees_with_transformers_plans(arch):
    """On files that ship a plan, the rule used for plan-less files derives the same styles."""
    from converter.analysis import analyze as analyze_source
    from converter.hf.resolve import resolve
    from converter.hf.tables import config_tp_plan
    from converter.passes.tp.dataflow import dataflow_styles
    from converter.passes.tp.plan import PLAN_STYLES
    from converter.pipeline import STAGES

    src = resolve(arch)
    text = src.path.read_text()
    module = cst.parse_module(text)
    ctx = ConversionContext.from_source(text, src.path, arch, f"transformers.models.{arch}")
    ctx.rules = load_rules()
    analyze_source(module, ctx)
    for stage in STAGES[: STAGES.index(tp.run)]:
        module = stage(module, ctx)
    derived = {attr: style for (_, attr), style in dataflow_styles(module, ctx).items()}
    base = {"colwise_gather_output": "colwise", "rowwise_split_input": "rowwise"}
    plan = {
        key.split(".")[-1]: base.get(PLAN_STYLES[style], PLAN_STYLES[style])
        for key, style in config_tp_plan(arch).items()
        if PLAN_STYLES[style] != "replicated"
    }
    assert derived == plan


def test_gathered_projections_keep_all_heads_on_every_rank():
    """OLMo-2-style plan: q/k/v gather their output (a norm over all heads follows), so
    attention runs every head and the output linear splits its (replicated) input."""
    plan = {f"layers.*.self_attn.{p}_proj": "colwise_gather_output" for p in "qkv"}
    plan["layers.*.self_attn.o_proj"] = "rowwise_split_input"
    code, ctx = convert(override=plan)
    assert "self.q_proj = ColumnParallelLinear(" in code and "gather_output=True" in code
    assert "PagedAttention(self.num_heads, self.head_dim" in code and "local_num_heads" not in code
    assert "input_is_parallel=False" in code


def test_a_linear_feeding_a_column_parallel_one_stays_replicated():
    """MLA's low-rank query (`q_a_proj` -> a norm over all its features -> `q_b_proj`):
    the dataflow rule alone would make the first column-parallel; a plan or a name making
    its consumer column-parallel too means its output must stay whole on every rank."""
    source = SNIPPET.replace(
        "        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)\n",
        "        self.q_low = nn.Linear(config.hidden_size, 32, bias=False)\n"
        "        self.q_low_norm = nn.LayerNorm(32)\n"
        "        self.q_proj = nn.Linear(32, self.num_heads * self.head_dim, bias=False)\n",
    ).replace(
        "q = self.q_proj(hidden_states)",
        "q = self.q_proj(self.q_low_norm(self.q_low(hidden_states)))",
    )
    code, ctx = convert(source)
    assert "self.q_low = nn.Linear(config.hidden_size, 32, bias=False)" in code
    assert ctx.tp_decisions["TinyAttention.q_low"] == (
        "replicated (dataflow: feeds q_proj, column-parallel by its plan)"
    )
    assert ctx.tp_decisions["TinyAttention.q_proj"].startswith("colwise")
