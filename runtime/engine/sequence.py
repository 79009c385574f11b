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
        # Identity tests: hashing an enum member (a dict lookup) costs a Python call.
        return self is not SequenceStatus.RUNNING and self is not SequenceStatus.WAITING

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
    their K/V in the cache (blocks ``block_table``), or are being computed by a step
    already scheduled; the rest are computed by later steps (a prompt in chunks, then one
    token per decode step). Preemption frees the blocks and sets ``num_computed_tokens``
    back to 0: the prompt and the output so far are computed again when the sequence is
    rescheduled, and sampling continues where it stopped.

    ``num_pending_tokens`` counts tokens a scheduled step samples whose ids the host does
    not know yet (asynchronous scheduling: the next step is scheduled while this one runs,
    and its input id is read on the device). They follow ``token_ids``: `num_tokens` counts
    them, ``token_ids`` and the output counts do not.
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
        # What `stop_reason` tests per sampled token: the ids that stop it, and the token
        # count at which it stops for length (max_tokens, or the context length).
        self._stop_ids = self.eos_token_ids | self.stop_token_ids
        limit = self.num_prompt_tokens + sampling_params.max_tokens
        self._length_limit = limit if max_model_len is None else min(limit, max_model_len)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
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
        """Known tokens and pending ones."""
        return len(self.token_ids) + self.num_pending_tokens

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
        status = self.status
        return status is not SequenceStatus.RUNNING and status is not SequenceStatus.WAITING

    @property
    def finish_reason(self) -> str | None:
        status = self.status
        if status is SequenceStatus.RUNNING or status is SequenceStatus.WAITING:
            return None
        return status.finish_reason

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold every token, pending ones included."""
        return (
            len(self.token_ids) + self.num_pending_tokens + self.block_size - 1
        ) // self.block_size

    @property
    def length_capped(self) -> bool:
        """Its pending tokens reach a length limit: the sequence finishes when they arrive,
        so no step computes anything more for it."""
        pending = self.num_pending_tokens
        return pending > 0 and len(self.token_ids) + pending >= self._length_limit

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        """A sampled token's id has arrived (the oldest pending one, if any)."""
        self.token_ids.append(token_id)
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1

    def stop_reason(self, token_id: int) -> SequenceStatus | None:
        """The finished status that `token_id` (just appended) causes, or None."""
        if token_id in self._stop_ids:
            return SequenceStatus.FINISHED_STOPPED
        if len(self.token_ids) >= self._length_limit:
            return SequenceStatus.FINISHED_LENGTH
        return None
