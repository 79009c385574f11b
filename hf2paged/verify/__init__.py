"""Checks of generated models against transformers: `parity` (logits of one model, prefill,
paged decode and chunked prefill) and `coverage` (every causal-LM architecture of the
installed transformers on a tiny random config)."""
