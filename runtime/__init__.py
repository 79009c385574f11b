"""The paged runtime that generated models run on."""

from runtime.attention import InputMetadata, PagedAttention

__all__ = ["InputMetadata", "PagedAttention"]
