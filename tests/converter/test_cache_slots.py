"""A stack whose attention offsets its cache index by a forward argument (hrm_text's
`self.layer_idx + cycle_offset`): one cache slot per (application, layer)."""

from __future__ import annotations

import pytest
import torch

from converter.errors import ConversionError
from runtime.attention import PagedAttention
from runtime.kv_cache import kv_cache_layouts
from tests.converter.snippets import TINY, code_of, prepare

# Unusual names: the offset is `hop`, the layer index attribute `depth`, the offset value
# the loop hands each block `shift`.
OFFSET = (
    TINY.replace(
        "    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):\n"
        "        input_shape",
        "    def forward(self, hidden_states, attention_mask=None, cache=None, hop=0, **kwargs):\n"
        "        input_shape",
    )
    .replace("k, v = cache.update(k, v, 0)", "k, v = cache.update(k, v, hop + self.depth)")
    .replace(
        "        self.head_size = config.hidden_size // config.num_attention_heads\n",
        "        self.head_size = config.hidden_size // config.num_attention_heads\n"
        "        self.depth = layer_idx\n",
    )
)
LOOPED = OFFSET.replace(
    "        for block in self.blocks:\n"
    "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n",
    "        for rep in range(3):\n"
    "            shift = rep * len(self.blocks)\n"
    "            for block in self.blocks:\n"
    "                hidden_states = block(hidden_states, mask, cache=cache, hop=shift, **kwargs)\n",
)


def test_each_application_indexes_its_own_slots():
    module, _ = prepare(LOOPED)  # every core pass, the pruner included
    model = code_of(module, "TinyModel")
    assert "shift = rep * len(self.blocks)" in model  # kept: the slot index reads it
    assert "kv_cache=kv_caches[shift + i], input_metadata=input_metadata" in model
    lm = code_of(module, "TinyForCausalLM")
    assert "self.num_kv_cache_slots = self.config.num_hidden_layers" in lm


def test_an_offset_the_loop_does_not_pass_fails_loudly():
    with pytest.raises(ConversionError, match="offsets its cache index by 'hop'"):
        prepare(OFFSET, through="flatten")


def test_no_offset_no_slots():
    module, _ = prepare(through="flatten")
    assert "num_kv_cache_slots" not in code_of(module, "TinyForCausalLM")


def test_runtime_allocates_every_declared_slot():
    model = torch.nn.Module()
    model.a, model.b = PagedAttention(2, 8, 1.0), PagedAttention(2, 8, 1.0)
    assert kv_cache_layouts(model) == [(2, 8, 8)] * 2
    model.num_kv_cache_slots = 6
    assert kv_cache_layouts(model) == [(2, 8, 8)] * 6
    model.b = PagedAttention(2, 4, 1.0)  # slots need one shared layout
    with pytest.raises(ValueError, match="declares 6 KV cache slots over 2 attention layers"):
        kv_cache_layouts(model)
