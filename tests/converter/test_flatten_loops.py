"""flatten: several loops over slices of the stack (dory's input / recurrent / output
sections) index the caches from each slice's start; a stack loop nested in another loop
without a per-application cache offset stops the conversion."""

from __future__ import annotations

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare

LOOP = (
    "        for block in self.blocks:\n"
    "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n"
)
SECTIONS = TINY.replace(
    LOOP,
    "        cut = self.config.num_hidden_layers - 1\n"
    "        for block in self.blocks[:cut]:\n"
    "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n"
    "        for k, block in enumerate(self.blocks[cut:]):\n"
    "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n",
)


def test_slices_index_from_their_start():
    module, _ = prepare(SECTIONS)
    model = code_of(module, "TinyModel")
    assert "for i, block in enumerate(self.blocks[:cut]):" in model
    assert "kv_cache=kv_caches[i], input_metadata=input_metadata" in model
    assert "kv_cache=kv_caches[cut + k], input_metadata=input_metadata" in model


def test_a_whole_loop_beside_a_slice_fails_loudly():
    source = SECTIONS.replace("enumerate(self.blocks[cut:])", "enumerate(self.blocks)")
    with pytest.raises(ConversionError, match=r"found 2 \(1 over all of it\)"):
        prepare(source, through="flatten")


def test_a_nested_loop_without_cache_offset_fails_loudly():
    source = TINY.replace(
        LOOP,
        "        for _ in range(2):\n"
        "            for block in self.blocks:\n"
        "                hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n",
    )
    with pytest.raises(ConversionError, match="applies its layers several times per forward"):
        prepare(source, through="flatten")
