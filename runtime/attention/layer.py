"""`PagedAttention`: the module every generated attention class calls."""

from __future__ import annotations

import os

import torch
from torch import nn

from runtime.attention.kv_layout import kv_cache_shape
from runtime.attention.metadata import InputMetadata
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref

BACKENDS = ("torch", "triton")


def select_backend(device: torch.device) -> str:
    """`HF2PAGED_ATTENTION_BACKEND` (torch|triton) wins; else Triton on CUDA, torch elsewhere.

    On CPU, Triton runs only under `TRITON_INTERPRET=1` (tests on small shapes).
    """
    forced = os.environ.get("HF2PAGED_ATTENTION_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"HF2PAGED_ATTENTION_BACKEND={forced!r}; expected one of {BACKENDS}")
        return forced
    return "triton" if device.type == "cuda" else "torch"


class PagedAttention(nn.Module):
    """Causal attention over a block-structured KV cache.

    ``forward(q, k, v, kv_cache, input_metadata)`` stores this step's k/v into
    ``kv_cache`` (shape `kv_cache_shape`: ``[2, num_blocks, block_size, num_kv_heads,
    head_dim]``) at ``input_metadata.slot_mapping`` and returns ``[T, num_heads *
    v_head_dim]``. ``v_head_dim`` (default ``head_dim``) is the value head size where it
    differs from the query/key one (MLA); the cache then holds both unpadded,
    ``[1, num_blocks, block_size, num_kv_heads, head_dim + v_head_dim]``.
    ``scale`` is the source model's own scaling (never defaulted here). ``sliding_window``
    follows transformers: key j is visible to query i iff ``i - W < j <= i``.
    ``alibi_slopes`` holds this rank's heads' slopes. ``sinks`` (a forward argument, since
    it is the source model's own parameter) is one fp32 logit per query head of this rank
    added to every softmax denominator (attention sinks, ``s_aux``). ``expanded_kv``: the
    source hands in k/v already repeated over each query group (``[T, Hq, D]``, query head
    h reading kv head ``h // (Hq // Hkv)``, Falcon's new decoder architecture); the layer
    caches one head per group, so the cache holds ``num_kv_heads``, not ``num_heads``.
    The ALiBi bias is ``slope * (j - i) * alibi_scale`` (``alibi_scale`` default 1); with
    ``alibi_bf16`` it is built as transformers' Falcon builds it, ``bf16(slope * bf16(j))
    * alibi_scale`` at absolute key position j (exact parity where slopes are not exact
    in bfloat16).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int | None = None,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | list[float] | None = None,
        logits_soft_cap: float | None = None,
        kv_cache_index: int | None = None,
        v_head_dim: int | None = None,
        expanded_kv: bool = False,
        alibi_scale: float | None = None,
        alibi_bf16: bool | None = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = float(scale)
        # transformers uses None (and sometimes 0 / negative) for "no window".
        self.sliding_window = int(sliding_window) if sliding_window and sliding_window > 0 else None
        self.logits_soft_cap = (
            float(logits_soft_cap) if logits_soft_cap and logits_soft_cap > 0 else None
        )
        self.kv_cache_index = kv_cache_index
        self.expanded_kv = expanded_kv
        self.alibi_scale = 1.0 if alibi_scale is None else float(alibi_scale)
        self.alibi_bf16 = bool(alibi_bf16)
        if alibi_slopes is not None:
            slopes = torch.as_tensor(alibi_slopes, dtype=torch.float32).flatten()
            if slopes.numel() != num_heads:
                raise ValueError(f"{slopes.numel()} ALiBi slopes for {num_heads} heads")
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"v_head_dim={self.v_head_dim}, "
            f"scale={self.scale:g}, sliding_window={self.sliding_window}, "
            f"logits_soft_cap={self.logits_soft_cap}, alibi={self.alibi_slopes is not None}"
        )

    def forward(
        self,
        query: torch.Tensor,  # [T, Hq*D] or [T, Hq, D]
        key: torch.Tensor,  # [T, Hkv*D] or [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv*Dv] or [T, Hkv, Dv]
        kv_cache: torch.Tensor,  # kv_cache_shape(num_blocks, block_size)
        input_metadata: InputMetadata,
        sinks: torch.Tensor | None = None,  # [Hq] attention-sink logits
    ) -> torch.Tensor:  # [T, Hq*Dv]
        num_tokens = query.shape[0]
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        if self.expanded_kv and key.numel() == num_tokens * self.num_heads * self.head_dim:
            group = self.num_heads // self.num_kv_heads  # copies of each kv head
            key = key.reshape(num_tokens, self.num_heads, self.head_dim)[:, ::group]
            value = value.reshape(num_tokens, self.num_heads, self.v_head_dim)[:, ::group]
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.reshape(num_tokens, self.num_kv_heads, self.v_head_dim)
        expected = self.kv_cache_shape(kv_cache.shape[1], kv_cache.shape[2])
        if kv_cache.shape != expected:
            raise ValueError(
                f"kv_cache {tuple(kv_cache.shape)} does not hold {self.num_kv_heads} kv heads "
                f"of dims {self.head_dim}/{self.v_head_dim}: expected {expected}"
            )
        if sinks is not None:
            sinks = sinks.float().reshape(self.num_heads)  # [Hq] fp32 (parameters may be bf16)
        if select_backend(query.device) == "triton":
            from runtime.attention import triton_ops

            # The kernels read each token's heads as one row; a source that built q/k/v
            # head-major ([B, H, T, D], e.g. MLA's torch.cat of parts) hands in strided views.
            query, key, value = (_heads_contiguous(t) for t in (query, key, value))

            triton_ops.reshape_and_cache(key, value, kv_cache, input_metadata.slot_mapping)
            out = triton_ops.paged_attention(
                query,
                kv_cache,
                input_metadata,
                scale=self.scale,
                sliding_window=self.sliding_window,
                alibi_slopes=self.alibi_slopes,
                logits_soft_cap=self.logits_soft_cap,
                sinks=sinks,
                alibi_scale=self.alibi_scale,
                alibi_bf16=self.alibi_bf16,
            )
        else:
            reshape_and_cache_ref(key, value, kv_cache, input_metadata.slot_mapping)
            out = paged_attention_ref(
                query,
                kv_cache,
                input_metadata,
                scale=self.scale,
                sliding_window=self.sliding_window,
                alibi_slopes=self.alibi_slopes,
                logits_soft_cap=self.logits_soft_cap,
                sinks=sinks,
                alibi_scale=self.alibi_scale,
                alibi_bf16=self.alibi_bf16,
            )
        return out.reshape(num_tokens, self.num_heads * self.v_head_dim)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of this layer's KV cache (`runtime.attention.kv_layout`)."""
        return kv_cache_shape(
            num_blocks, block_size, self.num_kv_heads, self.head_dim, self.v_head_dim
        )


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:  # [T, H, D]
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    """Every `PagedAttention` of ``model`` in module order, numbering `kv_cache_index`
    in that order where the converter did not set it."""
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    for i, layer in enumerate(layers):
        if layer.kv_cache_index is None:
            layer.kv_cache_index = i
    return layers
