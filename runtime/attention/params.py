"""What a paged attention computes besides q, k and v: one frozen value, built once per
layer and handed to either backend (`runtime.attention.backend`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

ALIBI_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class Alibi:
    """ALiBi: query head ``h`` at position ``i`` adds ``slopes[h] * (j - i) * scale`` to
    its score of key ``j``.

    ``slopes``: ``[H]``, one per query head of this rank (kept fp32 and contiguous).
    ``scale``: a factor on the bias once built, for sources that scale the sum
    ``q·k + bias`` (Falcon: ``(q·k + alibi) / sqrt(d)``); 1 where they do not.
    ``dtype``: the dtype in which the source builds ``slope * position``. ``float32``
    uses relative positions (the row constant ``-slope * i`` cancels in the softmax);
    ``bfloat16`` builds the bias as transformers' Falcon does, ``bf16(bf16(slope) *
    bf16(j))`` at the absolute key position ``j``, then multiplies by ``scale``, so parity
    holds where slopes or positions are inexact in bfloat16 (Falcon-RW's slopes, keys past
    256).
    """

    slopes: torch.Tensor | Sequence[float]
    scale: float = 1.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        slopes = torch.as_tensor(self.slopes, dtype=torch.float32).flatten().contiguous()
        object.__setattr__(self, "slopes", slopes)
        object.__setattr__(self, "scale", float(self.scale))
        if self.dtype not in ALIBI_DTYPES:
            raise ValueError(
                f"ALiBi built in {self.dtype} is not supported: the kernels build "
                f"slope * position in one of {[str(d) for d in ALIBI_DTYPES]}"
            )

    @property
    def rounds_bf16(self) -> bool:
        """Whether the bias is built in bfloat16 at absolute key positions (Falcon)."""
        return self.dtype == torch.bfloat16

    def to(self, device: torch.device | str) -> Alibi:
        return replace(self, slopes=self.slopes.to(device))

    def __repr__(self) -> str:
        return f"Alibi({self.slopes.numel()} slopes, scale={self.scale:g}, dtype={self.dtype})"


@dataclass(frozen=True)
class AttentionParams:
    """How a layer's scores are formed, in this order: ``q·k * scale``; soft-capping
    ``tanh(s / c) * c`` (``logits_soft_cap``); the ALiBi bias; the causal mask, narrowed
    by ``sliding_window`` (transformers' convention: key ``j`` is visible to query ``i``
    iff ``i - W < j <= i``) and by ``attention_chunk_size`` (chunk-local attention,
    transformers' ``create_chunked_causal_mask``: query ``i`` sees only the keys of its
    own chunk, ``j >= (i // C) * C``); softmax in fp32. With both, a key must pass both.

    ``scale`` is the source model's own scaling, never a default. transformers' "off"
    values for the window, the chunk size and the cap (``None``, ``0``, negative) become
    ``None``. ``attention_chunk_size`` is keyword-only (it sits beside the window it
    narrows like; positional calls keep their meaning).
    """

    scale: float
    sliding_window: int | None = None
    attention_chunk_size: int | None = field(default=None, kw_only=True)
    logits_soft_cap: float | None = None
    alibi: Alibi | None = None

    def __post_init__(self) -> None:
        window, cap, chunk = self.sliding_window, self.logits_soft_cap, self.attention_chunk_size
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "sliding_window", int(window) if window and window > 0 else None)
        object.__setattr__(
            self, "attention_chunk_size", int(chunk) if chunk and chunk > 0 else None
        )
        object.__setattr__(self, "logits_soft_cap", float(cap) if cap and cap > 0 else None)
        if self.alibi is not None and not isinstance(self.alibi, Alibi):
            raise TypeError(f"alibi must be an Alibi, got {type(self.alibi).__name__}")
