"""Paged attention: metadata, the `PagedAttention` layer and what it computes
(`AttentionParams`, `Alibi`), its two backends (torch reference, Triton kernels)."""

from runtime.attention.backend import AttentionBackend, select_backend
from runtime.attention.layer import PagedAttention, attention_layers
from runtime.attention.metadata import InputMetadata
from runtime.attention.params import Alibi, AttentionParams

__all__ = [
    "Alibi",
    "AttentionBackend",
    "AttentionParams",
    "InputMetadata",
    "PagedAttention",
    "attention_layers",
    "select_backend",
]
