"""`from hf2paged import LLM, SamplingParams`: the engine's classes, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_public_names_are_the_engines() -> None:
    import hf2paged
    import runtime.engine
    from hf2paged import LLM, RequestOutput, SamplingParams

    assert (LLM, RequestOutput, SamplingParams) == (
        runtime.engine.LLM, runtime.engine.RequestOutput, runtime.engine.SamplingParams,
    )  # fmt: skip
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        hf2paged.Engine  # noqa: B018


def test_importing_the_package_does_not_import_torch() -> None:
    script = "import sys, hf2paged; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
