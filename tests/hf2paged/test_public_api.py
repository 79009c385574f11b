"""`from hf2paged import LLM, SamplingParams`: the application layer's LLM (the engine's,
taking GGUF files and directories with their own code) and the engine's classes, imported
on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_public_names() -> None:
    import hf2paged
    import runtime.engine
    from hf2paged import LLM, RequestOutput, SamplingParams

    assert (RequestOutput, SamplingParams) == (
        runtime.engine.RequestOutput, runtime.engine.SamplingParams,
    )  # fmt: skip
    assert issubclass(LLM, runtime.engine.LLM) and LLM.__module__ == "hf2paged.llm"
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        hf2paged.Engine  # noqa: B018


def test_importing_the_package_does_not_import_torch() -> None:
    script = "import sys, hf2paged; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
