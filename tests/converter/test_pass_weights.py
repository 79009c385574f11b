"""The emitted load_weights on a toy module: HF renames (GPT-NeoX's embed_out ->
lm_head), base-model prefix, stacked q/k/v shards, tied head, skipped buffers,
strictness and shape errors."""

from __future__ import annotations

from collections.abc import Iterable

import libcst as cst
import pytest
import torch
from torch import nn

from converter.context import ConversionContext
from converter.passes.weights import load_weights_source
from runtime.checkpoint import load_checkpoint
from runtime.parallel import QKVParallelLinear


def _ctx(**facts) -> ConversionContext:
    ctx = ConversionContext.from_source(
        "", "modeling_gpt_neox.py", "gpt_neox", "transformers.models.gpt_neox"
    )
    ctx.lm_class = "GPTNeoXForCausalLM"
    for key, value in facts.items():
        setattr(ctx, key, value)
    return ctx


def toy_class(ctx: ConversionContext, tie: bool):
    source = load_weights_source(ctx)
    method = cst.parse_module(source).body[0].body.body[0]
    namespace = {
        "Iterable": Iterable,
        "torch": torch,
        "load_checkpoint": load_checkpoint,
    }
    exec(compile(cst.Module([method]).code, "load_weights", "exec"), namespace)

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_in = nn.Embedding(8, 4)
            self.attn = nn.Module()
            self.attn.qkv_proj = QKVParallelLinear(4, 2, 2, 1, bias=False)
            self.register_buffer("inv_freq", torch.ones(2), persistent=False)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"tie_word_embeddings": tie})()
            self.gpt_neox = Inner()
            self.lm_head = nn.Linear(4, 8, bias=False)
            if tie:
                self.lm_head.weight = self.gpt_neox.embed_in.weight

        load_weights = namespace["load_weights"]

    return Toy


CTX = dict(
    base_model_prefix="gpt_neox",
    stacked_params=[
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    ],
    tied_weights_keys={"lm_head.weight": "gpt_neox.embed_in.weight"},
)


def checkpoint(prefix: str = "gpt_neox.") -> dict[str, torch.Tensor]:
    return {
        f"{prefix}embed_in.weight": torch.randn(8, 4),
        f"{prefix}attn.q_proj.weight": torch.randn(4, 4),
        f"{prefix}attn.k_proj.weight": torch.randn(2, 4),
        f"{prefix}attn.v_proj.weight": torch.randn(2, 4),
        f"{prefix}inv_freq": torch.ones(2),  # old checkpoints saved the rotary buffer
        "embed_out.weight": torch.randn(8, 4),  # HF renames it to lm_head
    }


def test_renames_prefix_stacked_and_buffers():
    model = toy_class(_ctx(**CTX), tie=False)()
    for prefix in ("gpt_neox.", ""):
        ckpt = checkpoint(prefix)
        loaded = model.load_weights(ckpt.items())
        assert loaded == {
            "gpt_neox.embed_in.weight",
            "gpt_neox.attn.qkv_proj.weight",
            "lm_head.weight",
        }
        assert torch.equal(model.lm_head.weight, ckpt["embed_out.weight"])
        qkv = model.gpt_neox.attn.qkv_proj.weight
        assert torch.equal(qkv[4:6], ckpt[f"{prefix}attn.k_proj.weight"])


def test_tied_head_skips_the_saved_copy():
    model = toy_class(_ctx(**CTX), tie=True)()
    ckpt = checkpoint()
    ckpt["lm_head.weight"] = ckpt.pop("embed_out.weight")
    assert "lm_head.weight" not in model.load_weights(ckpt.items())
    assert model.lm_head.weight is model.gpt_neox.embed_in.weight


def test_strict_errors_name_everything():
    model = toy_class(_ctx(**CTX), tie=False)()
    ckpt = checkpoint()
    del ckpt["gpt_neox.attn.v_proj.weight"]
    ckpt["gpt_neox.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"1 checkpoint key\(s\) match no parameter \['gpt_neox.attn.extra.weight'\]; 1 parameter\(s\) not loaded "
        r"\['gpt_neox.attn.qkv_proj.weight \(no gpt_neox.attn.v_proj.weight\)'\]",
    ):
        model.load_weights(ckpt.items())
    ckpt = checkpoint()
    ckpt["gpt_neox.embed_in.weight"] = torch.zeros(8, 5)
    with pytest.raises(
        ValueError,
        match=r"gpt_neox.embed_in.weight \(checkpoint gpt_neox.embed_in.weight\): .*\(8, 4\).*\(8, 5\)",
    ):
        model.load_weights(ckpt.items())
