"""The step's `InputMetadata`, for attention layers that run inside a compiled region.

A model compiled by ``torch.compile`` (`runtime.engine.compile`) sees its attention as
one opaque operator (`runtime.attention.opaque_op`). What that operator needs from the
step besides tensors (host lists of query lengths, the longest query, how many tokens
prefill) must not enter the traced graph, or every new batch would be a new graph: the
engine sets the step's metadata here around the model call, and the operator reads it
when it runs. vLLM's ``forward_context`` does the same.

Eager runs never need it: `PagedAttention` then takes the metadata it is handed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from runtime.attention.metadata import InputMetadata

_METADATA: ContextVar[InputMetadata | None] = ContextVar("hf2paged_step_metadata", default=None)


@contextmanager
def step_metadata(metadata: InputMetadata) -> Iterator[InputMetadata]:
    """Make ``metadata`` the current step's for the duration of a model call."""
    token = _METADATA.set(metadata)
    try:
        yield metadata
    finally:
        _METADATA.reset(token)


def current_step_metadata() -> InputMetadata | None:
    """The metadata of the step being run (None outside `step_metadata`)."""
    return _METADATA.get()


def require_step_metadata() -> InputMetadata:
    metadata = _METADATA.get()
    if metadata is None:
        raise RuntimeError(
            "PagedAttention ran inside torch.compile without the step's metadata: call a "
            "compiled model through runtime.engine.compile.CompiledModel (it sets "
            "runtime.attention.forward_context.step_metadata around the call)"
        )
    return metadata
