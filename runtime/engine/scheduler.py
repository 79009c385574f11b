"""`Scheduler`: decides which tokens of which sequences the next step computes.

Continuous batching with chunked prefill, in the manner of vLLM v1: there is no separate
prefill or decode phase. Each step spends a token budget (`max_num_batched_tokens`)
first on running sequences in arrival order (a decode costs one token, an unfinished
prompt takes the next chunk that fits), then admits waiting sequences first come, first
served. When a running sequence needs a block and none is free, the most recently
admitted running sequence is preempted: its blocks are freed and it is recomputed later.

Scheduling may run one step ahead of the results (asynchronous scheduling, as vLLM v1's
``AsyncScheduler``): `schedule` counts the tokens it schedules as computed and each token
it will sample as pending (`Sequence.num_pending_tokens`) at once, so the next step can be
scheduled while this one runs; `update` later fills the pending tokens in, in step order.
A sequence whose pending tokens reach its length limit is not scheduled again; one that
turns out to have stopped (EOS, a stop token or string) had one more step scheduled,
whose result is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.engine.block_manager import BlockManager
from runtime.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What one step computes: `num_new_tokens[i]` tokens of `seqs[i]`, after its first
    `num_computed_tokens[i]` (its count when scheduled; `schedule` has already advanced
    the sequence's own). `sample[i]` says whether that chunk reaches the sequence's last
    token, so the step samples its next token."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def sampled_seqs(self) -> list[Sequence]:
        return [s for s, sample in zip(self.seqs, self.sample) if sample]


class Scheduler:
    """Owns the waiting queue and the running list; the block manager owns the blocks."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got "
                f"{max_num_seqs}, {max_num_batched_tokens}"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # Running sequences first, oldest first; victims come off the tail, which has not
        # been scheduled yet in this step.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and seq.length_capped:
                i += 1  # finishes when its pending token arrives
                continue
            while not bm.grow(seq):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._schedule(out, seq, budget)
                budget -= out.num_new_tokens[-1]
                i += 1

        # Admit waiting sequences unless this step had to preempt (the blocks are short).
        if not out.preempted or out.is_empty:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.num_pending_tokens and seq.length_capped:
                    break  # preempted while its last token is in flight: it finishes then
                if not bm.can_allocate(seq):
                    break
                self.waiting.popleft()
                bm.allocate(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                self._schedule(out, seq, budget)
                budget -= out.num_new_tokens[-1]
        assert not out.is_empty or not self.has_unfinished() or self._awaiting_results(), (
            "a step scheduled nothing"
        )
        return out

    def _awaiting_results(self) -> bool:
        """Some sequence waits for a token of a step in flight (nothing else may fit)."""
        return any(s.num_pending_tokens for s in self.running) or any(
            s.num_pending_tokens for s in self.waiting
        )

    def _schedule(self, out: SchedulerOutput, seq: Sequence, budget: int) -> None:
        computed = seq.num_computed_tokens
        total = len(seq.token_ids) + seq.num_pending_tokens
        n = total - computed
        if n > budget:
            n = budget
        assert n > 0, f"{seq} has nothing to compute"
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.num_computed_tokens.append(computed)
        seq.num_computed_tokens = computed + n
        if computed + n == total:
            out.sample.append(True)
            seq.num_pending_tokens += 1
        else:
            out.sample.append(False)
        if self.block_manager.enable_prefix_caching:
            self.block_manager.publish(seq, computed + n)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, keep the tokens, go to the front of the queue."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def recover(self, out: SchedulerOutput) -> None:
        """The step of `out` failed (an exception in the model or the sampler): none of
        its K/V can be trusted and its samples never arrive. Its sequences go back to the
        front of the queue to be recomputed, and the prefix cache forgets everything (the
        step published blocks that were never written, and sequences admitted with it may
        have hit them). Recover a later step in flight before an earlier one."""
        for seq, sample in zip(out.seqs, out.sample):
            if sample and seq.num_pending_tokens:
                seq.num_pending_tokens -= 1
        for seq in reversed(out.seqs):
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self._preempt(seq)
        self.block_manager.reset_prefix_cache()

    # ------------------------------------------------------------------ after the step
    def update(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Record the step's results: its sampled tokens (one per `sample` entry, in
        order) replace the sequences' oldest pending ones; sequences that hit EOS, a stop
        token or their length limit finish. A sequence that finished meanwhile (stopped
        by the step before, aborted) drops its token; one preempted meanwhile keeps it.
        Returns the sequences that got a new token."""
        assert len(sampled_token_ids) == sum(out.sample), "one sampled token per sampling sequence"
        tokens = iter(sampled_token_ids)
        grown = []
        released = False
        running = SequenceStatus.RUNNING
        for seq, sample in zip(out.seqs, out.sample):
            if not sample:
                continue
            token_id = next(tokens)
            status = seq.status
            if status is not running and status is not SequenceStatus.WAITING:
                seq.num_pending_tokens = 0  # finished: nothing more arrives for it
                continue
            seq.append_token(token_id)
            grown.append(seq)
            stop = seq.stop_reason(token_id)
            if stop is not None:
                if status is running:
                    self._release(seq, stop)
                    released = True
                else:  # preempted after this step was scheduled
                    self.finish(seq, stop)
        if released:
            self.running = [s for s in self.running if not s.is_finished]
        return grown

    def _release(self, seq: Sequence, status: SequenceStatus) -> None:
        self.block_manager.free(seq)
        seq.status = status

    def finish(
        self, seq: Sequence, status: SequenceStatus = SequenceStatus.FINISHED_STOPPED
    ) -> None:
        """End `seq` now (a stop string matched, or an abort): its blocks are freed at once."""
        assert status.is_finished
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._release(seq, status)

    def abort(self, seq: Sequence) -> None:
        self.finish(seq, SequenceStatus.FINISHED_ABORTED)
