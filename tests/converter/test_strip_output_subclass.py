"""strip: local subclasses of transformers' output dataclasses are outputs too (cwm's
`class CwmModelOutputWithPast(BaseModelOutputWithPast): pass`), so `return Sub(...)` is
unwrapped like `return BaseModelOutputWithPast(...)`."""

from types import SimpleNamespace

import libcst as cst

from converter.passes.strip import output_names
from converter.pipeline import load_rules

SOURCE = """
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

class CwmModelOutputWithPast(BaseModelOutputWithPast):
    pass

class Deeper(CwmModelOutputWithPast):
    pass

class NotAnOutput(object):
    pass
"""


def test_local_output_subclasses_are_output_names():
    ctx = SimpleNamespace(rules=load_rules())
    names = output_names(cst.parse_module(SOURCE), ctx)
    assert {"BaseModelOutputWithPast", "CwmModelOutputWithPast", "Deeper"} <= names
    assert "NotAnOutput" not in names
