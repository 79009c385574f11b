"""The two attention backends behind one interface: `PagedAttention` stores K/V and
attends through whichever `select_backend` picks, with one call each."""

from __future__ import annotations

import os
from typing import Protocol

import torch

from runtime.attention.metadata import InputMetadata
from runtime.attention.params import AttentionParams
from runtime.attention.reference import paged_attention_ref, reshape_and_cache_ref


class AttentionBackend(Protocol):
    name: str

    def store_kv(
        self,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, Dv]
        kv_cache: torch.Tensor,  # runtime.attention.kv_layout.kv_cache_shape(...)
        slot_mapping: torch.Tensor,  # [T] int64, < 0 = skip
    ) -> None:
        """Write each token's K/V at its cache slot."""

    def attend(
        self,
        query: torch.Tensor,  # [T, Hq, D]
        kv_cache: torch.Tensor,  # this step's K/V already stored
        metadata: InputMetadata,
        params: AttentionParams,
        sinks: torch.Tensor | None = None,  # [Hq] fp32
    ) -> torch.Tensor:  # [T, Hq, Dv]
        """Causal attention of every new token over its sequence's cached context."""


class TorchBackend:
    """`runtime.attention.reference`: any device, any strides; the tests' oracle."""

    name = "torch"

    def store_kv(self, key, value, kv_cache, slot_mapping) -> None:
        reshape_and_cache_ref(key, value, kv_cache, slot_mapping)

    def attend(self, query, kv_cache, metadata, params, sinks=None) -> torch.Tensor:
        return paged_attention_ref(query, kv_cache, metadata, params, sinks)


class TritonBackend:
    """`runtime.attention.triton_ops` (CUDA; on CPU only under ``TRITON_INTERPRET=1``).
    Triton is imported on first use, so CPU-only runs never need it."""

    name = "triton"

    def store_kv(self, key, value, kv_cache, slot_mapping) -> None:
        from runtime.attention import triton_ops

        triton_ops.reshape_and_cache(
            _heads_contiguous(key), _heads_contiguous(value), kv_cache, slot_mapping
        )

    def attend(self, query, kv_cache, metadata, params, sinks=None) -> torch.Tensor:
        from runtime.attention import triton_ops

        return triton_ops.paged_attention(
            _heads_contiguous(query), kv_cache, metadata, params, sinks
        )


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:  # [T, H, D]
    """The kernels read each token's heads as one row; a source that built q/k/v
    head-major ([B, H, T, D], e.g. MLA's torch.cat of parts) hands in strided views."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def store_and_attend(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, Dv]
    kv_cache: torch.Tensor,  # runtime.attention.kv_layout.kv_cache_shape(...)
    metadata: InputMetadata,
    params: AttentionParams,
    sinks: torch.Tensor | None = None,  # [Hq] fp32
) -> torch.Tensor:  # [T, Hq, Dv]
    """One attention layer's step on `select_backend`'s backend: store this step's K/V,
    then attend over the cache."""
    backend = select_backend(query.device)
    backend.store_kv(key, value, kv_cache, metadata.slot_mapping)
    return backend.attend(query, kv_cache, metadata, params, sinks)


BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (TorchBackend(), TritonBackend())}


def select_backend(device: torch.device) -> AttentionBackend:
    """`HF2PAGED_ATTENTION_BACKEND` (torch|triton) wins; else Triton on CUDA, torch elsewhere.

    On CPU, Triton runs only under `TRITON_INTERPRET=1` (tests on small shapes).
    """
    forced = os.environ.get("HF2PAGED_ATTENTION_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"HF2PAGED_ATTENTION_BACKEND={forced!r}; expected one of {tuple(BACKENDS)}"
            )
        return BACKENDS[forced]
    return BACKENDS["triton" if device.type == "cuda" else "torch"]
