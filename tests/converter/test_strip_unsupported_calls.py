"""strip: a call of a mask builder PagedAttention cannot express (rules/training.toml
[calls.unsupported_functions]: Llama 4's chunk-local mask) stops the conversion with one
line at the call, instead of being dropped like the causal mask builders."""

from __future__ import annotations

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, prepare


def test_a_chunked_mask_builder_stops_at_its_line():
    source = TINY.replace("create_causal_mask", "create_chunked_causal_mask")
    line = next(
        i
        for i, text in enumerate(source.splitlines(), 1)
        if "mask = create_chunked_causal_mask(" in text
    )
    with pytest.raises(
        ConversionError, match=rf":{line}: create_chunked_causal_mask\(\.\.\.\): chunk"
    ):
        prepare(source, through="strip")


def test_the_causal_mask_builder_is_still_dropped():
    module, _ = prepare(TINY, through="strip")
    assert "create_causal_mask(" not in module.code.split("import")[-1]
