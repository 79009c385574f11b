"""`SamplingParams`: how one request samples and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class SamplingParams:
    """Per-request sampling and stopping controls (vLLM's names and meanings).

    ``temperature == 0`` is greedy (argmax); the filters (top-k, top-p, min-p) then do
    nothing. ``repetition_penalty`` follows transformers: logits of every token already in
    the prompt or the output are divided by it when positive, multiplied when negative.
    ``presence_penalty`` and ``frequency_penalty`` follow OpenAI: each token's logit is
    lowered by ``frequency_penalty * count + presence_penalty * (count > 0)``, its count in
    the output so far (not the prompt); negative values encourage repetition.
    ``stop`` strings end generation when they appear in the detokenized output; the text
    returned stops before them. ``stop_token_ids`` (and EOS unless ``ignore_eos``) end it
    too and are kept as the last output token. ``seed`` gives the request its own random
    stream, so its tokens do not depend on what else is in the batch. ``logprobs=N``
    returns, per output token, the log-probability of the sampled token and of the N most
    likely ones, from the raw model distribution (before temperature and filters).

    Invalid values raise ``ValueError`` here, before anything is scheduled.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    # Normalised copy of `stop` (always a list); filled in __post_init__.
    stop_strings: list[str] = field(init=False, repr=False)
    # Derived in __post_init__ (the sampler reads them for every row of every step):
    # penalties read the tokens so far, so the engine knows them before sampling;
    # anything but a plain argmax needs the sampler's full path.
    needs_history: bool = field(init=False, repr=False, compare=False)
    needs_processing: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {self.logprobs}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not -(2**63) <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_strings = stops
        ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(
                f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}"
            )
        self.stop_token_ids = ids
        self.needs_history = (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )
        self.needs_processing = (
            self.temperature != 0 or self.needs_history or self.logprobs is not None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of sample `index` of several drawn for one prompt (OpenAI's `n`):
        the same, but a seeded request's samples draw from seeds ``seed + index`` so they
        differ from one another and still repeat run after run."""
        if index == 0 or self.seed is None:
            return self
        seed = self.seed + index
        return replace(self, seed=seed - 2**64 if seed >= 2**64 else seed)
