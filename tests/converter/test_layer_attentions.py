"""A decoder layer holding several attention modules in a list (LongCat-Flash's two MLA
sublayers), each with its own KV cache at the index the source computes for it.

Unusual names (`cores`, `depth`, `j`, three attentions per layer at ``3 * layer_idx + j``)
so nothing is found by name or by LongCat's arithmetic."""

from __future__ import annotations

import pytest
import torch

from converter.errors import ConversionError
from runtime.attention import PagedAttention
from runtime.kv_cache import kv_cache_layouts
from tests.converter.snippets import TINY, code_of, prepare

BLOCK = (
    "        self.attn_core = TinyAttention(config, layer_idx)\n",
    "        hidden_states, _ = self.attn_core(self.ln(hidden_states), attention_mask, cache, **kwargs)\n",
)
INDEXED = (
    TINY.replace(
        "k, v = cache.update(k, v, 0)", "k, v = cache.update(k, v, self.depth, cache_kwargs)"
    )
    .replace(
        "        self.head_size = config.hidden_size // config.num_attention_heads\n",
        "        self.head_size = config.hidden_size // config.num_attention_heads\n"
        "        self.depth = layer_idx\n",
    )
    .replace(
        BLOCK[0],
        "        self.cores = nn.ModuleList(\n"
        "            [TinyAttention(config, layer_idx=3 * layer_idx + j) for j in range(3)]\n"
        "        )\n",
    )
    .replace(
        BLOCK[1],
        "        hidden_states, _ = self.cores[0](self.ln(hidden_states), attention_mask, cache, **kwargs)\n"
        "        hidden_states, _ = self.cores[2](hidden_states, attention_mask, cache, **kwargs)\n"
        "        hidden_states, _ = self.cores[1](hidden_states, attention_mask, cache, **kwargs)\n",
    )
)
LOOPED = INDEXED.replace(
    "        hidden_states, _ = self.cores[0](self.ln(hidden_states), attention_mask, cache, **kwargs)\n"
    "        hidden_states, _ = self.cores[2](hidden_states, attention_mask, cache, **kwargs)\n"
    "        hidden_states, _ = self.cores[1](hidden_states, attention_mask, cache, **kwargs)\n",
    "        hidden_states = self.ln(hidden_states)\n"
    "        for core in self.cores:\n"
    "            hidden_states, _ = core(hidden_states, attention_mask, cache, **kwargs)\n",
)


def test_each_attention_of_the_list_reads_its_own_cache():
    module, ctx = prepare(INDEXED)
    assert ctx.stack_attr == "blocks"  # the outer list is the stack, not `cores`
    assert ctx.attention_lists == ["TinyBlock.cores"]
    assert ctx.cache_index == {"TinyAttention": "layer_idx"}  # self.depth's __init__ value
    attention = code_of(module, "TinyAttention")
    assert "kv_cache_index=layer_idx" in attention  # the source's own index
    assert "kv_caches[self.attn.kv_cache_index], input_metadata" in attention
    assert "kv_caches: list[torch.Tensor]" in attention
    block = code_of(module, "TinyBlock")
    assert "for j in range(3)" in block  # the source's arithmetic, kept
    assert block.count("kv_caches=kv_caches, input_metadata=input_metadata") == 3
    model = code_of(module, "TinyModel")
    assert "block(hidden_states, kv_caches=kv_caches, input_metadata=input_metadata)" in model
    assert "kv_caches[i]" not in model


def test_a_loop_over_the_list_passes_the_caches_too():
    module, _ = prepare(LOOPED)
    block = code_of(module, "TinyBlock")
    assert "core(hidden_states, kv_caches=kv_caches, input_metadata=input_metadata)" in block


def test_the_engine_allocates_one_cache_per_index():
    """`kv_cache_layouts` numbers caches by the converter's indices, in any module order,
    and refuses indices that are not 0..n-1 (two attentions on one cache)."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(
        [
            PagedAttention(2, 8, 1.0, kv_cache_index=3 * layer + j)
            for layer in range(2)
            for j in (0, 2, 1)
        ]
    )
    assert kv_cache_layouts(model) == [(2, 8, 8)] * 6
    model.layers[1].kv_cache_index = 0
    with pytest.raises(ValueError, match=r"kv_cache_index values must be 0..n-1"):
        kv_cache_layouts(model)


def test_an_attention_also_held_outside_the_list_fails_loudly():
    source = INDEXED.replace(
        "        self.ln = TinyNorm(config.hidden_size)\n",
        "        self.ln = TinyNorm(config.hidden_size)\n"
        "        self.extra = TinyAttention(config, layer_idx)\n",
        1,
    )
    with pytest.raises(
        ConversionError, match=r"attention modules in a list \(cores\) and elsewhere \(extra\)"
    ):
        prepare(source, through="flatten")


def test_an_index_not_from_init_parameters_fails_loudly():
    source = INDEXED.replace("        self.depth = layer_idx\n", "        self.depth = 0\n")
    with pytest.raises(ConversionError, match=r"cache index self\.depth is not set in __init__"):
        prepare(source, through="flatten")


def test_a_list_whose_attentions_share_an_index_fails_loudly():
    source = INDEXED.replace("layer_idx=3 * layer_idx + j", "layer_idx=layer_idx")
    with pytest.raises(ConversionError, match=r"passes each a different layer_idx="):
        prepare(source, through="flatten")


def test_an_attention_without_its_own_cache_index_fails_loudly():
    source = INDEXED.replace(
        "k, v = cache.update(k, v, self.depth, cache_kwargs)", "k, v = cache.update(k, v, 0)"
    )
    with pytest.raises(ConversionError, match=r"cannot tell which KV cache each attention"):
        prepare(source, through="flatten")
