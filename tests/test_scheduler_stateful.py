"""Scheduler + BlockManager under load: a stateful hypothesis test with a fake model.

The fake model stores each computed token id in a fake KV cache at its slot and checks,
for every query token, that the whole context it attends to holds the sequence's own
tokens: a block shared by mistake, lost on preemption, or overwritten by another sequence
shows up as a wrong token.

With asynchronous scheduling (drawn per example) each step is scheduled while the one
before is in flight, as the engine does: the fake device samples when a step launches,
the next step reads a pending input token from those samples, and the scheduler learns
them one step later.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_block_manager import check_block_invariants

from runtime.engine.block_manager import BlockManager
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.scheduler import Scheduler, SchedulerOutput
from runtime.engine.sequence import Sequence, SequenceStatus

VOCAB = 4
EOS = 3


def fake_forward(
    out: SchedulerOutput,
    cache: dict[int, int],
    block_size: int,
    before: tuple[SchedulerOutput, list[int]] | None = None,
) -> None:
    """Write every new token into `cache`, then check each sequence's visible context.
    `before`: the step in flight and its samples, where pending input tokens come from."""
    pending = {}
    if before is not None:
        sampling = before[0].sampled_seqs()
        pending = {s.seq_id: t for s, t in zip(sampling, before[1])}

    def token(seq: Sequence, pos: int) -> int:
        if pos < len(seq.token_ids):
            return seq.token_ids[pos]
        assert pos == len(seq.token_ids), f"{seq}: more than one pending input token"
        return pending[seq.seq_id]

    for seq, c, n in zip(out.seqs, out.num_computed_tokens, out.num_new_tokens):
        for pos in range(c, c + n):
            slot = seq.block_table[pos // block_size] * block_size + pos % block_size
            cache[slot] = token(seq, pos)
    for seq, c, n in zip(out.seqs, out.num_computed_tokens, out.num_new_tokens):
        end = c + n
        assert end <= seq.num_tokens and seq.num_computed_tokens == end
        for pos in range(end):
            slot = seq.block_table[pos // block_size] * block_size + pos % block_size
            assert cache.get(slot) == token(seq, pos), f"{seq}: wrong K/V at position {pos}"


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler | None = None
        self.cache: dict[int, int] = {}
        self.seqs: list[Sequence] = []
        self.aborted: set[int] = set()
        self.async_scheduling = False
        # The step in flight (async scheduling): its output and the tokens it sampled.
        self.in_flight: tuple[SchedulerOutput, list[int]] | None = None

    @precondition(lambda self: self.sched is None)
    @rule(
        num_blocks=st.integers(3, 10),
        block_size=st.integers(1, 4),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 12),
        caching=st.booleans(),
        async_scheduling=st.booleans(),
    )
    def init(self, num_blocks, block_size, max_num_seqs, budget, caching, async_scheduling):
        self.async_scheduling = async_scheduling
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
        # What a request may need at most, as LLM.add_request enforces.
        self.max_model_len = num_blocks * block_size

    @precondition(lambda self: self.sched is not None)
    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=10),
        max_tokens=st.integers(1, 8),
        ignore_eos=st.booleans(),
        stop_ids=st.lists(st.integers(0, VOCAB - 1), max_size=1),
    )
    def add_request(self, prompt, max_tokens, ignore_eos, stop_ids) -> None:
        if len(prompt) >= self.max_model_len:
            return  # rejected by add_request before scheduling
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_ids
        )
        seq = Sequence(
            len(self.seqs),
            prompt,
            params,
            self.bm.block_size,
            eos_token_id=EOS,
            max_model_len=self.max_model_len,
        )
        self.sched.add(seq)
        self.seqs.append(seq)

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule(data=st.data())
    def abort(self, data) -> None:
        live = [s for s in self.seqs if not s.is_finished]
        seq = data.draw(st.sampled_from(live))
        free_before = self.bm.num_free_blocks
        owned = sum(1 for b in seq.block_table if self.bm.blocks[b].ref_count == 1)
        self.sched.abort(seq)
        self.aborted.add(seq.seq_id)
        assert seq.status is SequenceStatus.FINISHED_ABORTED and seq.block_table == []
        assert self.bm.num_free_blocks == free_before + owned, "abort must free blocks at once"

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule(data=st.data())
    def step(self, data) -> None:
        """Schedule and launch a step; under async scheduling, then take the results of
        the step before, else its own."""
        out = self.sched.schedule()
        if out.is_empty:
            # Only while every sequence left waits for a token of the step in flight.
            assert self.in_flight is not None
            assert all(s.num_pending_tokens for s in self.sched.running)
        assert out.num_tokens <= self.sched.max_num_batched_tokens
        assert len(out.seqs) <= self.sched.max_num_seqs
        assert len({s.seq_id for s in out.seqs}) == len(out.seqs)
        for p in out.preempted:
            assert p.status is SequenceStatus.WAITING and not p.block_table
            assert p not in out.seqs
        fake_forward(out, self.cache, self.bm.block_size, self.in_flight)
        sampled = [data.draw(st.integers(0, VOCAB - 1)) for _ in range(sum(out.sample))]
        launched = (out, sampled) if not out.is_empty else None
        if self.async_scheduling:
            self.drain()
            self.in_flight = launched
        elif launched is not None:
            self.sched.update(*launched)

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def drain(self) -> None:
        """Take the results of the step in flight."""
        if self.in_flight is not None:
            self.sched.update(*self.in_flight)
            self.in_flight = None

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule()
    def failed_step(self) -> None:
        """The model raised during the step: its sequences are recomputed later (a step
        in flight before it still delivers its samples)."""
        out = self.sched.schedule()
        self.sched.recover(out)
        assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in out.seqs)
        assert not self.bm.hash_to_block_id
        pending = {s.seq_id for s in self.in_flight[0].sampled_seqs()} if self.in_flight else set()
        for s in out.seqs:
            assert s.num_pending_tokens == (s.seq_id in pending and not s.is_finished)

    @invariant()
    def consistent(self) -> None:
        if self.sched is None:
            return
        live = [s for s in self.seqs if s.block_table]
        check_block_invariants(self.bm, live)
        assert set(map(id, live)) == set(map(id, self.sched.running))
        assert all(s.status is SequenceStatus.RUNNING for s in self.sched.running)
        assert all(s.status is SequenceStatus.WAITING for s in self.sched.waiting)
        assert len(self.sched.running) <= self.sched.max_num_seqs
        for s in self.seqs:
            if s.is_finished:
                assert not s.block_table
                self.check_finished(s)

    def check_finished(self, s: Sequence) -> None:
        if s.seq_id in self.aborted:
            assert s.finish_reason == "abort"
            return
        if s.finish_reason == "stop":
            last = s.token_ids[-1]
            assert (last == EOS and not s.sampling_params.ignore_eos) or last in s.stop_token_ids
        else:
            assert s.finish_reason == "length"
            assert (
                s.num_output_tokens == s.sampling_params.max_tokens
                or s.num_tokens == self.max_model_len
            )
        assert s.num_output_tokens <= s.sampling_params.max_tokens

    def teardown(self) -> None:
        if self.sched is None:
            return
        # Drain: every request finishes (no livelock), then every block is free.
        limit = 10 + sum(s.num_tokens + s.sampling_params.max_tokens for s in self.seqs) * 4
        for _ in range(limit):
            if not self.sched.has_unfinished():
                break
            out = self.sched.schedule()
            fake_forward(out, self.cache, self.bm.block_size, self.in_flight)
            self.drain()
            self.in_flight = (out, [1] * sum(out.sample))
            if not self.async_scheduling:
                self.drain()
        self.drain()
        assert not self.sched.has_unfinished(), "requests did not finish"
        for s in self.seqs:
            assert s.is_finished
            self.check_finished(s)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
