"""Converting the issue's 8 architectures (every pipeline stage) stays under 10 s on a
2-core CPU, and is deterministic."""

import time
from pathlib import Path

import pytest

from converter.pipeline import convert_file

transformers = pytest.importorskip("transformers")
MODELS = Path(transformers.__file__).parent / "models"
ARCHS = ["opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]


@pytest.mark.slow  # wall-clock bound: meaningful on an otherwise idle machine
def test_all_archs_convert_fast_and_deterministically():
    paths = [MODELS / t / f"modeling_{t}.py" for t in ARCHS]
    convert_file(paths[0])  # warm imports (typer, jinja2, ruff binary lookup)
    start = time.perf_counter()
    codes = [convert_file(p).code for p in paths]
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"converting {len(paths)} architectures took {elapsed:.1f} s"
    assert convert_file(paths[1]).code == codes[1]
