"""Paged attention: metadata, the `PagedAttention` layer, torch reference and Triton kernels."""

from runtime.attention.layer import PagedAttention, attention_layers, select_backend
from runtime.attention.metadata import InputMetadata

__all__ = ["InputMetadata", "PagedAttention", "attention_layers", "select_backend"]
