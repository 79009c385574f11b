"""`Sequence`: the state of one request as the scheduler, block manager and runner see it."""

from __future__ import annotations

import enum

from runtime.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One request: its tokens, how many of them are in the KV cache, and its blocks.

    ``token_ids`` holds prompt then output tokens. ``num_computed_tokens`` of them have
    their K/V in the cache (blocks ``block_table``); the rest are computed by later steps
    (a prompt in chunks, then one token per decode step). Preemption frees the blocks and
    sets ``num_computed_tokens`` back to 0: the prompt and the output so far are computed
    again when the sequence is rescheduled, and sampling continues where it stopped.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        block_size: int,
        request_id: str | None = None,
        prompt: str | None = None,
        eos_token_id: int | list[int] | None = None,
        max_model_len: int | None = None,
    ) -> None:
        assert prompt_token_ids, "empty prompts are rejected before a Sequence is made"
        self.seq_id = seq_id
        self.request_id = request_id if request_id is not None else str(seq_id)
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        # Kept apart from token_ids so outputs can share it every step without a copy.
        self._prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.max_model_len = max_model_len
        if eos_token_id is None or sampling_params.ignore_eos:
            self.eos_token_ids: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos_token_ids = frozenset([eos_token_id])
        else:
            self.eos_token_ids = frozenset(eos_token_id)
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at the last allocation (statistics).
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of the full blocks of `token_ids` (prefix caching). Tokens are only
        # ever appended, so once computed a hash stays valid, across preemptions too.
        self.block_hashes: list[int] = []
        # How many of this sequence's blocks the block manager has published in its
        # prefix cache since the last allocation.
        self.num_published_blocks = 0
        self.num_preemptions = 0
        # The request's own random stream when it has a seed (made by the sampler).
        self.generator = None
        # The engine's IncrementalDetokenizer when the model has a tokenizer.
        self.detokenizer = None
        # Per-output-token log-probabilities when requested: (sampled_logprob, {id: logprob}).
        self.logprobs: list[tuple[float, dict[int, float]]] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold every token known so far."""
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def stop_reason(self, token_id: int) -> SequenceStatus | None:
        """The finished status that `token_id` (just appended) causes, or None."""
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.sampling_params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if self.max_model_len is not None and len(self.token_ids) >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None
