"""`AsyncLLM`: the front end of an engine that steps on its own, for asyncio callers.

A front end on an event loop (the HTTP server; nothing here knows of HTTP) adds requests
with `add_request` and reads each one's `RequestStream`. The engine core
(`runtime.engine.engine_core`) steps elsewhere: in a process of its own
(`EngineProcess`, what the server uses) or on a thread of this one (`AsyncLLM(llm)`, for
the Python API and tests); the front end does not care which. Commands queued during one
turn of the event loop go to the core as one batch; the core sends back one output per
step, which is turned here into per-request updates: new text (detokenized here, with
stop strings matched here: a hit ends the sample and aborts it in the engine), token ids
and logprobs. A reader that falls behind gets everything that arrived since it last read
in one update. The optional `RequestObserver` hears about first tokens, inter-token gaps
and finishes (metrics).

Validation and tokenization (`RequestChecker`) run here, so a bad request fails in
`add_request` itself. A stream that is closed early, or whose reader is cancelled (a
client that disconnected), aborts its request: the engine frees its KV blocks before its
next step. `max_waiting` bounds the requests queued but not yet running; beyond it
`add_request` raises `EngineOverloaded`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, replace

from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.engine_core import (
    CommandBatch,
    CoreOutput,
    EngineInfo,
    EngineStats,
    EngineThread,
)
from runtime.engine.engine_process import EngineProcess
from runtime.engine.llm import Prompt
from runtime.engine.loading import CheckedRequest, RequestChecker
from runtime.engine.sampler import Logprobs
from runtime.engine.sampling_params import SamplingParams

__all__ = [
    "AsyncLLM", "EngineDeadError", "EngineError", "EngineOverloaded", "EngineStats",
    "RequestObserver", "RequestStream", "StreamUpdate",
]  # fmt: skip

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; `retry_after` (seconds) is when to try again."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(RuntimeError):
    """The engine failed this request (a step raised, or the engine is not running)."""


class EngineDeadError(EngineError):
    """The engine is not running: shut down, or stopped on its own (its process died, or
    its loop stopped on an error). Every request fails with it until a restart."""


@dataclass
class StreamUpdate:
    """What one sample of a request produced since its previous update (one engine step,
    or several merged when the reader fell behind).

    ``text`` is the new text; while the request runs, the last characters that could be
    the start of a stop string are held back, so the texts of all updates add up to the
    final text. ``token_ids`` (and ``logprobs``, when requested) are the new tokens.
    ``finish_reason`` is set on the sample's last update ("stop", "length", "abort").
    """

    index: int  # which of the request's `n` samples
    text: str
    token_ids: list[int]
    logprobs: list[Logprobs] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far, this update's tokens included

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestObserver:
    """Hooks for metrics, called on the event loop; times in seconds. `on_step` once per
    engine step that produced tokens, with the latencies of those tokens (first tokens:
    from arrival; later ones: from the request's previous token); `on_finished` once per
    sample ("stop", "length", "abort" or "error"). Subclass and override what you need
    (the defaults do nothing)."""

    def on_step(
        self, first_token_latencies: list[float], inter_token_latencies: list[float]
    ) -> None: ...

    def on_finished(
        self, finish_reason: str, num_prompt_tokens: int, num_output_tokens: int, latency: float
    ) -> None: ...


class _Sample:
    """Front-end state of one engine request (one of a `RequestStream`'s samples): its
    text so far and what arrived since its reader last read."""

    __slots__ = (
        "engine_id", "index", "stream", "arrival", "last_token_time", "num_tokens",
        "detokenizer", "all_ids", "new_ids", "new_logprobs", "finish_reason", "done", "ready",
    )  # fmt: skip

    def __init__(
        self, engine_id: str, index: int, stream: RequestStream, params: SamplingParams,
        tokenizer, detokenize: bool,
    ) -> None:  # fmt: skip
        self.engine_id = engine_id
        self.index = index
        self.stream = stream
        self.arrival = time.perf_counter()
        self.last_token_time: float | None = None
        self.num_tokens = 0  # output tokens received
        # Text grows token by token for readers of partial text and for stop strings;
        # otherwise it is decoded once at the end (`all_ids`), as `LLM.generate` does.
        self.detokenizer = None
        self.all_ids: list[int] | None = None
        if tokenizer is not None:
            if detokenize or params.stop_strings:
                self.detokenizer = IncrementalDetokenizer(tokenizer, params.stop_strings)
            else:
                self.all_ids = []
        self.new_ids: list[int] = []
        self.new_logprobs: list[Logprobs] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.done = False  # finished, aborted or failed: no more tokens are taken
        self.ready = False  # in its stream's list of samples with news

    def take_update(self, tokenizer) -> StreamUpdate:
        """What arrived since the last update, as one update."""
        finished = self.finish_reason is not None
        if self.detokenizer is not None:
            text = self.detokenizer.stream_delta(finished)
        elif finished and self.all_ids is not None:
            text = tokenizer.decode(self.all_ids, skip_special_tokens=True)
        else:
            text = ""
        update = StreamUpdate(
            self.index, text, self.new_ids, self.new_logprobs, self.finish_reason,
            len(self.stream.prompt_token_ids), self.num_tokens,
        )  # fmt: skip
        self.new_ids = []
        if self.new_logprobs is not None:
            self.new_logprobs = []
        self.ready = False
        return update


class RequestStream:
    """The updates of one request, read with ``async for updates in stream`` on the
    event loop that added it: each item is a list of `StreamUpdate`, at most one per
    sample, holding whatever arrived since the previous item. The iteration ends when
    every sample has finished. Leaving it early (break, an exception, cancellation)
    aborts the request; so does `abort()`.
    """

    def __init__(self, engine: AsyncLLM, request_id: str, prompt_token_ids: list[int], n: int):
        self.engine = engine
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.n = n
        self.samples: list[_Sample] = []
        self._ready: list[_Sample] = []  # samples with updates not read yet
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._num_open = n  # samples whose last update was not read yet
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._num_open == 0

    def _notify(self, sample: _Sample | None = None) -> None:
        if sample is not None and not sample.ready:
            sample.ready = True
            self._ready.append(sample)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[StreamUpdate]:
        while not self._ready:
            if self._error is not None:
                self.abort()
                raise self._error
            if self._num_open == 0:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except BaseException:  # cancelled while waiting: the reader is gone
                self.abort()
                raise
            finally:
                self._waiter = None
        if self._error is not None:
            self.abort()
            raise self._error
        ready, self._ready = self._ready, []
        if len(ready) > 1:
            ready.sort(key=lambda s: s.index)
        tokenizer = self.engine.tokenizer
        updates = [sample.take_update(tokenizer) for sample in ready]
        for update in updates:
            if update.finish_reason is not None:
                self._num_open -= 1
        return updates

    def abort(self) -> None:
        """Stop every unfinished sample now (idempotent)."""
        if self._aborted or self._num_open == 0:
            return
        self._aborted = True
        self._num_open = 0
        self.engine._abort(self)


class AsyncLLM:
    """The asyncio front end of an engine stepping on its own: an `EngineProcess` (the
    engine in a process of its own) or an `LLM` (stepped by a thread of this process).

    ``async with AsyncLLM(engine) as llm:`` (or `start()` / `close()` from the event
    loop) starts the engine stepping; `add_request` queues work from the loop. An `LLM`
    stays the caller's to close, after this; an `EngineProcess` ends with `close()`.
    `stats` is the engine's state after its latest step.
    """

    def __init__(
        self,
        engine,
        max_waiting: int | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 or None, got {max_waiting}")
        self.core = (
            engine if isinstance(engine, (EngineProcess, EngineThread)) else EngineThread(engine)
        )
        self.info: EngineInfo = self.core.info
        self.checker: RequestChecker = self.core.checker
        self.max_waiting = max_waiting
        self.observer = observer or RequestObserver()
        self.stats = EngineStats(
            num_blocks=self.info.num_blocks, num_free_blocks=self.info.num_blocks
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = self._stopping = False
        self._error: str | None = None  # why the engine stopped on its own
        self._samples: dict[str, _Sample] = {}  # engine request id -> sample
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._engine_ids = itertools.count()
        # Commands of this turn of the event loop, sent as one batch at its end.
        self._adds: dict[str, CheckedRequest] = {}
        self._aborts: list[str] = []
        self._flush_scheduled = False
        self._serial = 0
        self._unacked: deque[tuple[int, int]] = deque()  # (batch serial, adds in it)
        self._num_unacked = 0

    # ------------------------------------------------------------------ what it serves
    @property
    def tokenizer(self):
        return self.checker.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.checker.max_model_len

    def check_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> CheckedRequest:
        """Validate and tokenize a request (ValueError when bad) without queueing it."""
        return self.checker.check(prompt, sampling_params)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.checker.chat_prompt(messages)

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        """Start the engine stepping; call from the event loop that will read the streams."""
        if self._started:
            raise RuntimeError("AsyncLLM is already started")
        self._loop = asyncio.get_running_loop()
        self._started = True
        self.core.start(self._on_output, self._on_exit)

    async def close(self) -> None:
        """Abort every request and stop the engine (an `LLM` stays open)."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._flush(stop=True)
        await self.core.join()
        self._fail_all(EngineDeadError("the engine was shut down"))
        self.core.close()

    async def __aenter__(self) -> AsyncLLM:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def is_running(self) -> bool:
        """Whether the engine is stepping and accepting requests."""
        return self._started and not self._stopping and self._error is None and self.core.is_alive

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: Prompt | CheckedRequest,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        n: int = 1,
        detokenize: bool = True,
    ) -> RequestStream:
        """Queue `n` samples of one prompt (text, token ids, or a `check_request` result)
        and return their stream. Raises ValueError for a bad request, `EngineOverloaded`
        when the waiting queue is full and `EngineDeadError` when the engine is not running.
        ``detokenize=False`` leaves the text of updates empty until the sample finishes
        (for callers that read only the final text)."""
        if not self.is_running:
            raise EngineDeadError(self.dead_message())
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if self.max_waiting is not None:
            waiting = self.num_waiting
            if waiting and waiting + n > self.max_waiting:
                raise EngineOverloaded(
                    f"the server is overloaded: {waiting} requests are waiting (limit "
                    f"{self.max_waiting}); retry later"
                )
        if isinstance(prompt, CheckedRequest):
            if sampling_params is not None:
                raise ValueError("a checked request carries its own sampling_params")
            checked = prompt
        else:
            checked = self.checker.check(prompt, sampling_params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(self, request_id, checked.prompt_token_ids, n)
        params = checked.sampling_params
        # Stop strings are matched here, on the text made here: the engine gets none.
        engine_params = replace(params, stop=None) if params.stop_strings else params
        for i in range(n):
            engine_id = str(next(self._engine_ids))
            sample = _Sample(engine_id, i, stream, params, self.tokenizer, detokenize)
            stream.samples.append(sample)
            self._samples[engine_id] = sample
            self._adds[engine_id] = replace(checked, sampling_params=engine_params.for_sample(i))
        self._streams[request_id] = stream
        self._schedule_flush()
        return stream

    @property
    def num_waiting(self) -> int:
        """Requests waiting for the engine: in its scheduler's queue or on their way."""
        return self.stats.num_waiting + self._num_unacked + len(self._adds)

    def _abort(self, stream: RequestStream) -> None:
        ids = []
        for sample in stream.samples:
            if not sample.done:
                self._finish(sample, "abort")
                ids.append(sample.engine_id)
        self._streams.pop(stream.request_id, None)
        self._cancel(ids)

    def _cancel(self, engine_ids: list[str]) -> None:
        """Abort engine requests: those not sent yet are dropped, the others are aborted
        in the engine before its next step."""
        for engine_id in engine_ids:
            if self._adds.pop(engine_id, None) is None:
                self._aborts.append(engine_id)
        if self._aborts:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self, stop: bool = False) -> None:
        """Send this turn's commands to the engine as one batch."""
        self._flush_scheduled = False
        if not (self._adds or self._aborts or stop) or (self._error is not None and not stop):
            return
        self._serial += 1
        if self._adds:
            self._unacked.append((self._serial, len(self._adds)))
            self._num_unacked += len(self._adds)
        batch = CommandBatch(self._serial, list(self._adds.items()), self._aborts, stop)
        self._adds, self._aborts = {}, []
        self.core.send(batch)

    # ------------------------------------------------------------------ engine outputs
    def _on_output(self, output: CoreOutput) -> None:
        while self._unacked and self._unacked[0][0] <= output.applied:
            self._num_unacked -= self._unacked.popleft()[1]
        self.stats = output.stats
        now = time.perf_counter()
        first_latencies: list[float] = []
        gaps: list[float] = []
        stopped: list[str] = []
        samples = self._samples
        for engine_id, token_id, logprobs, finish_reason in output.rows:
            sample = samples.get(engine_id)
            if sample is None:  # aborted, or stopped by a stop string, since the step began
                continue
            if sample.last_token_time is None:
                first_latencies.append(now - sample.arrival)
            else:
                gaps.append(now - sample.last_token_time)
            sample.last_token_time = now
            sample.num_tokens += 1
            sample.new_ids.append(token_id)
            if sample.new_logprobs is not None:
                sample.new_logprobs.append(logprobs)
            detokenizer = sample.detokenizer
            if detokenizer is not None:
                if detokenizer.add_token(token_id) and finish_reason is None:
                    finish_reason = "stop"  # a stop string: the text ends before it
                    stopped.append(engine_id)
                if finish_reason is not None:
                    detokenizer.flush()
            elif sample.all_ids is not None:
                sample.all_ids.append(token_id)
            if finish_reason is not None:
                sample.finish_reason = finish_reason
                self._finish(sample, finish_reason)
                self._close_if_done(sample.stream)
            sample.stream._notify(sample)
        if stopped:
            self._cancel(stopped)
        if first_latencies or gaps:
            self.observer.on_step(first_latencies, gaps)
        for engine_id, bad_request, message in output.failed:
            sample = samples.get(engine_id)
            if sample is not None:
                self._fail(
                    sample.stream, ValueError(message) if bad_request else EngineError(message)
                )
        if output.died is not None:
            self._on_exit(f"the engine stopped: {output.died}")

    def _on_exit(self, reason: str) -> None:
        """The engine stopped on its own (an error, or its process died)."""
        if self._stopping:
            return
        self._error = reason
        log.error("%s: every request fails until a restart", reason)
        self._fail_all(EngineDeadError(reason))

    def _finish(self, sample: _Sample, finish_reason: str) -> None:
        sample.done = True
        self._samples.pop(sample.engine_id, None)
        self.observer.on_finished(
            finish_reason, len(sample.stream.prompt_token_ids), sample.num_tokens,
            time.perf_counter() - sample.arrival,
        )  # fmt: skip

    def _close_if_done(self, stream: RequestStream) -> None:
        if all(s.done for s in stream.samples):
            self._streams.pop(stream.request_id, None)

    def _fail(self, stream: RequestStream, exc: BaseException) -> None:
        """End `stream` with `exc`: its reader raises it; its other samples are aborted."""
        stream._error = exc
        stream._notify()
        ids = []
        for sample in stream.samples:
            if not sample.done:
                self._finish(sample, "error")
                ids.append(sample.engine_id)
        self._streams.pop(stream.request_id, None)
        if self.is_running:
            self._cancel(ids)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            self._fail(stream, exc)

    def dead_message(self) -> str:
        """Why the engine is not running (for error messages)."""
        if self._error is not None:
            return self._error
        if not self._started:
            return "the engine is not started"
        if not self._stopping:
            return self.core.exit_reason()
        return "the engine is shut down"
