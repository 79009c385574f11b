"""strip: a call of a mask builder PagedAttention cannot express (rules/training.toml
[calls.unsupported_functions], with its reason) stops the conversion with one line at the
call, instead of being dropped like the causal mask builders."""

from __future__ import annotations

import copy

import pytest

from converter.errors import ConversionError
from converter.pipeline import load_rules
from tests.converter.snippets import TINY, prepare


def test_an_unsupported_mask_builder_stops_at_its_line(monkeypatch):
    rules = copy.deepcopy(load_rules())
    rules["training"]["calls"]["unsupported_functions"] = {"create_causal_mask": "a reason"}
    monkeypatch.setitem(prepare.__globals__, "load_rules", lambda: rules)
    line = next(i for i, text in enumerate(TINY.splitlines(), 1) if "mask = create_causal_" in text)
    with pytest.raises(ConversionError, match=rf":{line}: create_causal_mask\(\.\.\.\): a reason"):
        prepare(TINY, through="strip")


def test_the_causal_mask_builder_is_dropped():
    module, _ = prepare(TINY, through="strip")
    assert "mask = None" in module.code
