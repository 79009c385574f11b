"""`RequestOutput`: what `LLM.generate` and `LLM.step` return for one request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """A request's state after a step, or its result once finished.

    ``token_ids`` are the output tokens (a stop token or EOS that ended generation is the
    last of them); ``text`` is their detokenization, cut before a matched stop string.
    ``finish_reason`` is "stop" (EOS, a stop token or a stop string), "length"
    (`max_tokens` or the context length) or "abort", and None while running.
    ``logprobs`` (when requested): per output token, ``(logprob of the sampled token,
    {token_id: logprob} of the top ones)``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[tuple[float, dict[int, float]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class TokenDelta:
    """What one step added to one request (`LLM.step_tokens`): its newest token, that
    token's logprobs when requested, and the finish reason once finished (its text is the
    reader's to make: `IncrementalDetokenizer`)."""

    request_id: str
    token_id: int
    logprobs: tuple[float, dict[int, float]] | None
    finish_reason: str | None
    num_output_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
