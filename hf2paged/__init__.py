"""hf2paged's application layer and public Python API.

    from hf2paged import LLM, SamplingParams

`LLM` is the engine's front door made to take what a user names (a model directory, a
GGUF file, a directory with its own code under ``trust_remote_code=True``:
`hf2paged/llm.py`); `SamplingParams` and `RequestOutput` are the engine's
(`runtime.engine`). All are imported on first use so that `import hf2paged` (and
`hf2paged convert`) stays free of torch. The command line is `hf2paged.cli`;
verification against transformers is `hf2paged.verify`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf2paged.llm import LLM
    from runtime.engine import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from hf2paged.llm import LLM

        return LLM
    if name in __all__:
        import runtime.engine

        return getattr(runtime.engine, name)
    raise AttributeError(f"module 'hf2paged' has no attribute {name!r}")
