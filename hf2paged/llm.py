"""`hf2paged.LLM`: the engine's `LLM`, given whatever a user names.

The engine (`runtime.engine.LLM`) loads a transformers model directory whose
architecture generated/ holds. This front door first makes the model loadable on the
user's behalf (`model_source.prepare_model`): a GGUF file is converted once into a cached
model directory, and a directory carrying its own code is converted once into the
per-user cache of generated modules when `trust_remote_code=True` (refused with one line
otherwise); the engine is then handed the directory and the generated class. Progress
of first-time conversions goes to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hf2paged.model_source import prepare_model
from runtime.engine.llm import LLM as EngineLLM


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LLM(EngineLLM):
    """`runtime.engine.LLM(model, ...)` for a model directory, a GGUF file, or (with
    ``trust_remote_code=True``) a model directory with its own modeling code."""

    def __init__(self, model: str | Path, *args, trust_remote_code: bool = False, **kwargs) -> None:
        source = prepare_model(model, trust_remote_code=trust_remote_code, log=_progress)
        kwargs.setdefault("model_class", source.model_class)
        super().__init__(source.path, *args, trust_remote_code=trust_remote_code, **kwargs)
