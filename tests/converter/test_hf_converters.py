"""WeightConverter entries read from conversion_mapping-like source: one Chunk or
Concatenate becomes a load_weights table; anything else stays unsupported."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

import libcst as cst
import pytest
import torch
from torch import nn

import converter.passes.weights as weights_pass
from converter.context import ConversionContext
from converter.hf.converters import Converter, parse_converter
from converter.hf.tables import Renaming
from runtime.checkpoint import load_checkpoint


def _parse(code: str) -> Converter | None:
    return parse_converter(ast.parse(code, mode="eval").body)


def test_chunk_and_concatenate_are_read():
    chunk = _parse(
        'WeightConverter(source_patterns="blob.zz_fused.weight", '
        'target_patterns=["blob.zz_a.weight", "blob.zz_b.weight"], operations=[Chunk(dim=0)])'
    )
    assert chunk == Converter(
        ("blob.zz_fused.weight",), ("blob.zz_a.weight", "blob.zz_b.weight"), (("chunk", 0),)
    )
    assert chunk.table() == (
        "chunk",
        0,
        [r"blob.zz_fused.weight(?!\w)"],
        ["blob.zz_a.weight", "blob.zz_b.weight"],
    )
    cat = _parse('WeightConverter(["*.p1", "*.p2"], "*.pp", [Concatenate(1)])')
    assert cat == Converter(("*.p1", "*.p2"), ("*.pp",), (("concatenate", 1),))


def test_module_list_merges_are_read():
    # transformers' MoE chains: per-expert tensors stacked, gate and up then joined
    merged = _parse(
        'WeightConverter(source_patterns=["mlp.zz_experts.*.w1.weight", "mlp.zz_experts.*.w3.weight"], '
        'target_patterns="mlp.zz_experts.gate_up_proj", '
        "operations=[MergeModulelist(dim=0), Concatenate(dim=1)])"
    )
    assert merged.table() == (
        (("merge_modulelist", 0), ("concatenate", 1)),
        [r"mlp.zz_experts.(\d+).w1.weight(?!\w)", r"mlp.zz_experts.(\d+).w3.weight(?!\w)"],
        ["mlp.zz_experts.gate_up_proj"],
    )
    down = _parse('WeightConverter("mlp.e.*.w2.weight", "mlp.e.down_proj", [MergeModulelist(0)])')
    assert down.table() == (
        (("merge_modulelist", 0),),
        [r"mlp.e.(\d+).w2.weight(?!\w)"],
        ["mlp.e.down_proj"],
    )
    code = weights_pass._converter_entry(merged.table())
    assert code.startswith('((("merge_modulelist", 0), ("concatenate", 1)), [r"mlp')
    assert eval(code) == merged.table()
    single = weights_pass._converter_entry(((("merge_modulelist", 0),), [r"e.(\d+).w2"], ["d"]))
    assert single == r'((("merge_modulelist", 0),), [r"e.(\d+).w2"], ["d"])'
    assert eval(single) == ((("merge_modulelist", 0),), [r"e.(\d+).w2"], ["d"])


def test_prefix_change_is_a_renaming():
    from converter.hf.tables import _transform

    remove = _transform(
        ast.parse(
            "PrefixChange(prefix_to_remove='language_model', model_prefix='model')", mode="eval"
        ).body
    )
    assert remove == Renaming((r"^model\.language_model\.(.+)",), r"model.\1")
    add = _transform(ast.parse("PrefixChange(prefix_to_add='timm_model')", mode="eval").body)
    ((pattern, target),) = add.regexes()
    assert re.sub(pattern, target, "head.weight", count=1) == "timm_model.head.weight"
    assert re.sub(pattern, target, "timm_model.head.weight", count=1) == "timm_model.head.weight"


@pytest.mark.parametrize(
    "code",
    [
        'WeightConverter("a", ["b", "c"], [Chunk(dim=0), PermuteForRope()])',  # chained
        'WeightConverter("a", ["b"], [Chunk(dim=0)])',  # one target: nothing to split
        'WeightConverter(["a", "b"], "c", [Concatenate(dim=0, num_shards_attribute="n")])',
        'WeightConverter(["a", "b"], "c", [MergeModulelist(dim=0)])',  # no list index
        'WeightConverter(["e.*.a", "e.*.b"], "c", [MergeModulelist(dim=0)])',  # 2 sources, no join
        'WeightConverter("e.*.a", "c", [MergeModulelist(dim=0), Chunk(dim=1)])',
        'WeightConverter("a", ["b", "c"], [Chunk(dim=0)], distributed_operation=X())',
    ],
)
def test_other_converters_stay_unsupported(code):
    assert _parse(code) is None


def test_load_weights_replays_the_chunk(monkeypatch):
    monkeypatch.setattr(
        weights_pass,
        "checkpoint_transforms",
        lambda _cls, _type: (
            [Renaming((r"\.old_o\.",), ".new_o.")],
            [
                _parse(
                    'WeightConverter("q.zz_fused.weight", ["q.zz_a.weight", "q.zz_b.weight"], [Chunk(0)])'
                )
            ],
        ),
    )
    ctx = ConversionContext.from_source("", "modeling_zz.py", "zz", "transformers.models.zz")
    ctx.lm_class = "ZzForCausalLM"
    source = weights_pass.load_weights_source(ctx)
    assert "converters=converters" in source
    method = cst.parse_module(source).body[0].body.body[0]
    namespace = {"Iterable": Iterable, "torch": torch, "load_checkpoint": load_checkpoint}
    exec(compile(cst.Module([method]).code, "load_weights", "exec"), namespace)

    class Toy(nn.Module):
        load_weights = namespace["load_weights"]

        def __init__(self):
            super().__init__()
            self.config = None
            self.q = nn.Module()
            self.q.zz_a = nn.Linear(2, 3, bias=False)
            self.q.zz_b = nn.Linear(2, 3, bias=False)
            self.x = nn.Module()
            self.x.new_o = nn.Linear(3, 2, bias=False)

    fused, o = torch.randn(6, 2), torch.randn(2, 3)
    model = Toy()
    # the rename applies first, then the chunk; each piece loads into its own parameter
    assert model.load_weights([("q.zz_fused.weight", fused), ("x.old_o.weight", o)]) == {
        "q.zz_a.weight",
        "q.zz_b.weight",
        "x.new_o.weight",
    }
    assert torch.equal(model.q.zz_a.weight, fused[:3])
    assert torch.equal(model.q.zz_b.weight, fused[3:])
    assert torch.equal(model.x.new_o.weight, o)


def test_no_converters_no_table():
    ctx = ConversionContext.from_source("", "modeling_zz.py", "zz", "transformers.models.zz")
    ctx.lm_class = "ZzForCausalLM"
    assert "converters" not in weights_pass.load_weights_source(ctx)


def test_code_defined_renaming_is_replayed_by_name(monkeypatch):
    from converter.hf.converters import NamedRenaming
    from converter.hf.tables import _transform

    assert _transform(ast.parse("LayerPairCollapse()", mode="eval").body) == NamedRenaming(
        "LayerPairCollapse"
    )
    monkeypatch.setattr(
        weights_pass,
        "checkpoint_transforms",
        lambda _cls, _type: (
            [NamedRenaming("LayerPairCollapse"), Renaming((r"\.zz\.",), ".yy.")],
            [],
        ),
    )
    ctx = ConversionContext.from_source("", "modeling_zz.py", "zz", "transformers.models.zz")
    ctx.lm_class = "ZzForCausalLM"
    source = weights_pass.load_weights_source(ctx)
    # in order, before the regex renames that may depend on it
    assert '            LAYER_PAIR_COLLAPSE,\n            (r"\\.zz\\.", ".yy."),' in source
