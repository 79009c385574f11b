"""hf2paged's application layer and public Python API.

    from hf2paged import LLM, SamplingParams

`LLM`, `SamplingParams` and `RequestOutput` are the engine's (`runtime.engine`),
imported on first use so that `import hf2paged` (and `hf2paged convert`) stays free of
torch. The command line is `hf2paged.cli`; verification against transformers is
`hf2paged.verify`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.engine import LLM, RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in __all__:
        import runtime.engine

        return getattr(runtime.engine, name)
    raise AttributeError(f"module 'hf2paged' has no attribute {name!r}")
