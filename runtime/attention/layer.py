"""`PagedAttention`: the module every generated attention class calls."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from runtime.attention.backend import store_and_attend
from runtime.attention.kv_layout import kv_cache_shape
from runtime.attention.metadata import InputMetadata
from runtime.attention.opaque_op import opaque_attention
from runtime.attention.params import Alibi, AttentionParams


def _param(name: str) -> property:
    """A `PagedAttention` attribute that reads ``self.params.<name>``; setting it
    rebuilds ``params`` (tests switch a feature off on a built model)."""

    def set_param(self: PagedAttention, value) -> None:
        self.params = replace(self.params, **{name: value})

    return property(lambda self: getattr(self.params, name), set_param)


class PagedAttention(nn.Module):
    """Causal attention over a block-structured KV cache.

    ``forward(q, k, v, kv_cache, input_metadata)`` stores this step's k/v into
    ``kv_cache`` (shape `kv_cache_shape`: ``[2, num_blocks, block_size, num_kv_heads,
    head_dim]``) at ``input_metadata.slot_mapping`` and returns ``[T, num_heads *
    v_head_dim]``. ``v_head_dim`` (default ``head_dim``) is the value head size where it
    differs from the query/key one (MLA); the cache then holds both unpadded,
    ``[1, num_blocks, block_size, num_kv_heads, head_dim + v_head_dim]``.

    The scores (``scale``, ``sliding_window``, ``attention_chunk_size``,
    ``logits_soft_cap``, ``alibi``) are one
    `AttentionParams`, ``self.params``, built here and handed to the backend as is;
    the attributes of the same names read it, and setting one rebuilds it.
    ``alibi``: an `Alibi` with this rank's heads' slopes; they follow the module's
    device and stay fp32 whatever dtype the module is cast to. ``sinks`` (a forward
    argument, since it is the source model's own parameter) is one logit per query head
    of this rank added to every softmax denominator (attention sinks, ``s_aux``; used in
    fp32). k/v may come with ``num_kv_heads`` heads or, where the source repeats them
    over each query group before attention (``repeat_kv``, Falcon's ``broadcast_to``),
    with ``num_heads``: query head h then reads kv head ``h // (num_heads //
    num_kv_heads)`` and the cache holds one head per group.

    Under ``torch.compile`` the store + attend is one opaque operator
    (`runtime.attention.opaque_op`) that reads the step's metadata from
    `runtime.attention.forward_context`; everything else here is traced.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        *,
        num_kv_heads: int | None = None,
        sliding_window: int | None = None,
        attention_chunk_size: int | None = None,
        logits_soft_cap: float | None = None,
        alibi: Alibi | None = None,
        v_head_dim: int | None = None,
        kv_cache_index: int | None = None,
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
        self.kv_cache_index = kv_cache_index
        self.params = AttentionParams(
            scale,
            sliding_window=sliding_window,
            attention_chunk_size=attention_chunk_size,
            logits_soft_cap=logits_soft_cap,
            alibi=alibi,
        )

    @property
    def params(self) -> AttentionParams:
        return self._params

    @params.setter
    def params(self, params: AttentionParams) -> None:
        alibi = params.alibi
        if alibi is not None and alibi.slopes.numel() != self.num_heads:
            raise ValueError(f"{alibi.slopes.numel()} ALiBi slopes for {self.num_heads} heads")
        self._params = params

    scale = _param("scale")
    sliding_window = _param("sliding_window")
    attention_chunk_size = _param("attention_chunk_size")
    logits_soft_cap = _param("logits_soft_cap")
    alibi = _param("alibi")

    def _apply(self, fn, recurse=True):
        # The ALiBi slopes are no buffer (casting the module to bf16 must not round them):
        # they move with the module's device only.
        super()._apply(fn, recurse)
        if self.alibi is not None:
            self.alibi = self.alibi.to(fn(self.alibi.slopes).device)
        return self

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, scale={p.scale:g}, "
            f"sliding_window={p.sliding_window}, attention_chunk_size={p.attention_chunk_size}, "
            f"logits_soft_cap={p.logits_soft_cap}, "
            f"alibi={p.alibi}"
        )

    def forward(
        self,
        query: torch.Tensor,  # [T, Hq*D] or [T, Hq, D]
        key: torch.Tensor,  # [T, Hkv*D] or [T, Hkv, D] (or Hq heads, repeated per group)
        value: torch.Tensor,  # [T, Hkv*Dv] or [T, Hkv, Dv] (likewise)
        kv_cache: torch.Tensor,  # kv_cache_shape(num_blocks, block_size)
        input_metadata: InputMetadata,
        sinks: torch.Tensor | None = None,  # [Hq] attention-sink logits
    ) -> torch.Tensor:  # [T, Hq*Dv]
        num_tokens = query.shape[0]
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        key = self._kv_heads(key, self.head_dim, "key")
        value = self._kv_heads(value, self.v_head_dim, "value")
        expected = self.kv_cache_shape(kv_cache.shape[1], kv_cache.shape[2])
        if kv_cache.shape != expected:
            raise ValueError(
                f"kv_cache {tuple(kv_cache.shape)} does not hold {self.num_kv_heads} kv heads "
                f"of dims {self.head_dim}/{self.v_head_dim}: expected {expected}"
            )
        if sinks is not None:
            sinks = sinks.float().reshape(self.num_heads)  # [Hq] fp32 (parameters may be bf16)
        if torch.compiler.is_compiling():
            # One opaque operator: the metadata's host lists stay out of the traced graph
            # (runtime.attention.opaque_op reads them from the step's forward context).
            out = opaque_attention(query, key, value, kv_cache, self.params, sinks)
        else:
            out = store_and_attend(query, key, value, kv_cache, input_metadata, self.params, sinks)
        return out.reshape(num_tokens, self.num_heads * self.v_head_dim)

    def _kv_heads(self, x: torch.Tensor, dim: int, what: str) -> torch.Tensor:  # [T, Hkv, dim]
        """``x`` as ``[T, Hkv, dim]``. A tensor of ``num_heads`` heads holds each kv head
        repeated over its query group (kv head g at heads ``g*G .. g*G+G-1``): keep the
        first of each group."""
        num_tokens, group = x.shape[0], self.num_heads // self.num_kv_heads
        if x.numel() == num_tokens * self.num_kv_heads * dim:
            return x.reshape(num_tokens, self.num_kv_heads, dim)
        if group > 1 and x.numel() == num_tokens * self.num_heads * dim:
            return x.reshape(num_tokens, self.num_heads, dim)[:, ::group]
        raise ValueError(
            f"{what} {tuple(x.shape)} of {num_tokens} tokens: expected {self.num_kv_heads} "
            f"kv heads of {dim} (or {self.num_heads} heads, each kv head repeated over its "
            f"query group)"
        )

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of this layer's KV cache (`runtime.attention.kv_layout`)."""
        return kv_cache_shape(
            num_blocks, block_size, self.num_kv_heads, self.head_dim, self.v_head_dim
        )


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    """Every `PagedAttention` of ``model`` in module order, numbering `kv_cache_index`
    in that order where the converter did not set it."""
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    for i, layer in enumerate(layers):
        if layer.kv_cache_index is None:
            layer.kv_cache_index = i
    return layers
