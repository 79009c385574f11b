"""load_checkpoint's tensor converters (transformers' WeightConverter Chunk / Concatenate)
on synthetic checkpoints, composed with stacked shards and TP sharding."""

from __future__ import annotations

import re

import pytest
import torch
from distributed import run_distributed
from torch import nn

from runtime.checkpoint import load_checkpoint
from runtime.parallel import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear

# Odd names on purpose: nothing may depend on "gate_up" or "qkv" spellings.
CONVERTERS = [
    ("chunk", 0, [r"ffn\.both_w(?!\w)"], ["ffn.left.weight", "ffn.right.weight"]),
    ("concatenate", 1, [r"mix\.a_w(?!\w)", r"mix\.b_w(?!\w)"], ["mix.out.weight"]),
]
STACKED = [("ffn.lr", "ffn.left", 0), ("ffn.lr", "ffn.right", 1)]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = nn.Module()
        self.blk.ffn = nn.Module()
        self.blk.ffn.lr = MergedColumnParallelLinear(4, [6, 6], bias=False)
        self.blk.mix = nn.Module()
        self.blk.mix.out = RowParallelLinear(8, 3, bias=False)
        self.blk.plain = ColumnParallelLinear(4, 2, bias=False)


def checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "root.blk.ffn.both_w": torch.randn(12, 4, generator=g),  # [left; right] rows
        "root.blk.mix.b_w": torch.randn(3, 3, generator=g),  # listed before a_w on purpose
        "root.blk.mix.a_w": torch.randn(3, 5, generator=g),
        "root.blk.plain.weight": torch.randn(2, 4, generator=g),
    }


def load(model: nn.Module, ckpt: dict[str, torch.Tensor]) -> set[str]:
    return load_checkpoint(
        model,
        ckpt.items(),
        renames=[(r"^root\.", "")],
        stacked_params_mapping=STACKED,
        prefix="",
        ignored=[],
        tied=set(),
        converters=CONVERTERS,
    )


def _check_sharded(rank: int, world_size: int) -> list[float]:
    torch.manual_seed(0)
    model = Toy()
    ckpt = checkpoint()
    assert load(model, ckpt) == {"blk.ffn.lr.weight", "blk.mix.out.weight", "blk.plain.weight"}
    left, right = ckpt["root.blk.ffn.both_w"].chunk(2, dim=0)  # [6, 4] each
    rows = 6 // world_size
    want_lr = torch.cat([p[rank * rows : (rank + 1) * rows] for p in (left, right)])
    joined = torch.cat([ckpt["root.blk.mix.a_w"], ckpt["root.blk.mix.b_w"]], dim=1)  # [3, 8]
    cols = 8 // world_size
    want_mix = joined[:, rank * cols : (rank + 1) * cols]
    return [
        (model.blk.ffn.lr.weight - want_lr).abs().max().item(),
        (model.blk.mix.out.weight - want_mix).abs().max().item(),
    ]


def test_chunk_and_concatenate_tp1():
    assert _check_sharded(0, 1) == [0.0, 0.0]


def test_chunk_and_concatenate_tp2_shard_each_piece():
    assert run_distributed(_check_sharded, 2) == [[0.0, 0.0], [0.0, 0.0]]


def test_concatenation_short_of_a_source_is_an_error():
    ckpt = checkpoint()
    del ckpt["root.blk.mix.b_w"]
    with pytest.raises(
        ValueError,
        match=r"\['root.blk.mix.a_w \(no other source for blk.mix.out.weight\)'\]; "
        r"1 parameter\(s\) not loaded \['blk.mix.out.weight'\]",
    ):
        load(Toy(), ckpt)


def test_a_chunk_of_the_wrong_size_names_the_fused_key():
    ckpt = checkpoint()
    ckpt["root.blk.ffn.both_w"] = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"blk.ffn.lr.weight \(checkpoint root.blk.ffn.both_w\)"):
        load(Toy(), ckpt)


def test_layer_pair_collapse_renames_pairs_into_one_layer():
    from runtime.checkpoint import LAYER_PAIR_COLLAPSE

    pattern, replace = LAYER_PAIR_COLLAPSE
    cases = {
        "m.layers.0.mixer.wq.weight": "m.layers.0.self_attn.wq.weight",
        "m.layers.5.mixer.up.weight": "m.layers.2.mlp.up.weight",
        "m.layers.6.attn_alpha": "m.layers.3.lambda_1",
        "m.layers.7.mlp_alpha": "m.layers.3.lambda_2",
        "m.layers.7.mixers.x": "m.layers.7.mixers.x",  # a longer name: untouched
    }
    for old, new in cases.items():
        assert re.sub(pattern, replace, old, count=1) == new
