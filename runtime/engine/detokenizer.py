"""Incremental detokenization and stop strings, one `IncrementalDetokenizer` per request.

Decoding token by token breaks multi-byte characters and, for SentencePiece-style
tokenizers, word-leading spaces. So each step decodes a short window twice, from
`prefix_offset`: up to `read_offset` (text already emitted) and up to the end; the
difference is the new text, held back while it ends in an incomplete character (U+FFFD).
The concatenated deltas equal decoding the whole output at once.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


def _fast_decoder(tokenizer):
    """The Rust tokenizer's own `decode` when the Python wrapper would add nothing to it:
    the wrapper's argument normalisation costs ~10x the decode itself, twice per token
    per request per step, which dominated the engine's host time at batch 256."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "decode")
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Output text of one request, grown one token at a time, cut at stop strings."""

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.stopped = False
        # Characters already handed to a stream (see `stream_delta`).
        self.num_streamed = 0
        self._decode = _fast_decoder(tokenizer)

    def add_token(self, token_id: int) -> bool:
        """Append an output token; returns True when a stop string matched (the text then
        ends right before it)."""
        assert not self.stopped, "token after a stop string"
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self._grow(full[len(prefix) :])
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
        return self.stopped

    def flush(self) -> None:
        """At the end: emit whatever is still held back (an incomplete character)."""
        if self.stopped or self.read_offset == len(self.token_ids):
            return
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self._grow(full[len(prefix) :])
        self.read_offset = len(self.token_ids)

    def _grow(self, delta: str) -> None:
        start = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        if not self.stop:
            return
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def stream_delta(self, finished: bool) -> str:
        """Text not yet streamed. While running, the last ``max_stop_len - 1`` characters
        stay back: they may be the start of a stop string that is cut later."""
        end = len(self.text) if finished else max(0, len(self.text) - max(0, self.max_stop_len - 1))
        if end <= self.num_streamed:
            return ""
        delta = self.text[self.num_streamed : end]
        self.num_streamed = end
        return delta
