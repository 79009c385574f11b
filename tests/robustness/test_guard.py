"""The last line of defence (`converter.guard.stage_errors`) and the import check
(`converter.hf.availability`), tested directly."""

from __future__ import annotations

import re

import libcst as cst
import pytest
from cli_helpers import GENERATED, one_error_line, run_cli, snapshot, source_of

import converter.pipeline
from converter.errors import InternalConversionError
from converter.hf.availability import module_available
from converter.hf.resolve import modeling_file
from converter.pipeline import convert_source


def _buggy_stage(module: cst.Module, ctx) -> cst.Module:
    """A pass with a bug: it fails on the decoder layer's class statement."""
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value == "LlamaDecoderLayer":
            return {}["missing fact"]
    return module


def test_unanticipated_exception_names_stage_and_source_line():
    path = modeling_file("llama")
    text = source_of("llama")
    with pytest.raises(InternalConversionError) as info:
        convert_source(text, path, "llama", stages=[_buggy_stage])
    line = text.splitlines().index("class LlamaDecoderLayer(GradientCheckpointingLayer):") + 1
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: internal error in the test_guard stage: KeyError")
    assert "[`class LlamaDecoderLayer(GradientCheckpointingLayer):`]" in message
    assert message.endswith("(HF2PAGED_DEBUG=1 shows the traceback)")
    assert isinstance(info.value.__cause__, KeyError)  # kept for HF2PAGED_DEBUG


def test_cli_reports_a_pass_bug_in_one_line(monkeypatch):
    monkeypatch.setattr(
        converter.pipeline, "STAGES", [*converter.pipeline.STAGES[:2], _buggy_stage]
    )
    before = snapshot(GENERATED)
    line = one_error_line(run_cli("convert", "llama"))
    assert re.search(r"modeling_llama\.py:\d+: internal error in the test_guard stage", line)
    assert snapshot(GENERATED) == before


@pytest.mark.parametrize(
    "name, available",
    [
        ("os.path", True),  # a stdlib alias, not a file
        ("torch.nn.functional", True),
        ("transformers.models.llama.modeling_llama", True),
        ("transformers.models.no_such_model.modeling_x", False),
        ("runtime.attention", True),
        ("runtime.no_such_module", False),
        ("hf2paged_missing_kernels", False),
        ("collections.abc_renamed", True),  # stdlib: trusted, never probed
    ],
)
def test_module_available(name, available):
    assert module_available(name) is available
