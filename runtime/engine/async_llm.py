"""`AsyncLLM`: the engine steps in a background thread while requests come and go.

A front end on an asyncio event loop (the HTTP server; nothing here knows of HTTP) adds
requests with `add_request` and reads each one's `RequestStream`. One engine thread owns
the `LLM`: before every step it takes the requests added and aborted since the last one,
then steps the whole running batch (continuous batching across all callers), and hands
the step's outputs to the event loop in one call. There they are turned into per-request
deltas (new text, token ids, logprobs) on each request's own queue, and the optional
`RequestObserver` hears about first tokens, inter-token gaps and finishes (metrics).

Validation and tokenization (`LLM.check_request`) run on the caller's thread, so a bad
request fails in `add_request` itself. A stream that is closed early, or whose reader
is cancelled (a client that disconnected), aborts its request: the engine thread frees
its KV blocks before its next step. `max_waiting` bounds the requests queued but not yet
running; beyond it `add_request` raises `EngineOverloaded`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace

from runtime.engine.llm import LLM, Prompt
from runtime.engine.loading import CheckedRequest
from runtime.engine.outputs import TokenDelta
from runtime.engine.sampler import Logprobs
from runtime.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; `retry_after` (seconds) is when to try again."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(RuntimeError):
    """The engine failed this request (a step raised, or the engine was closed)."""


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


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after its latest step (read by metrics and health checks)."""

    num_running: int = 0
    num_waiting: int = 0  # queued in the scheduler or handed to the engine thread
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    num_steps: int = 0


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
    """Event-loop state of one engine request (one of a `RequestStream`'s samples)."""

    __slots__ = (
        "engine_id", "index", "stream", "arrival", "last_token_time", "num_tokens",
        "num_chars", "holdback", "num_prompt_tokens", "finished",
    )  # fmt: skip

    def __init__(self, engine_id: str, index: int, stream: RequestStream, holdback: int) -> None:
        self.engine_id = engine_id
        self.index = index
        self.stream = stream
        self.arrival = time.perf_counter()
        self.last_token_time: float | None = None
        self.num_tokens = 0  # output tokens handed to the stream
        self.num_chars = 0  # characters of text handed to the stream
        self.holdback = holdback  # characters kept back while running (stop strings)
        self.num_prompt_tokens = len(stream.prompt_token_ids)
        self.finished = False


class RequestStream:
    """The updates of one request, read with ``async for updates in stream`` on the
    event loop that added it: each item is a list of `StreamUpdate`, at most one per
    sample, merging whatever arrived since the previous item. The iteration ends when
    every sample has finished. Leaving it early (break, an exception, cancellation)
    aborts the request; so does `abort()`.
    """

    def __init__(self, engine: AsyncLLM, request_id: str, prompt_token_ids: list[int], n: int):
        self.engine = engine
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.n = n
        self.samples: list[_Sample] = []
        # Updates not read yet, and the future a waiting reader sleeps on: cheaper than an
        # asyncio.Queue, whose put wakes the reader once per update.
        self._pending: list[StreamUpdate | BaseException] = []
        self._waiter: asyncio.Future | None = None
        self._num_open = n
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._num_open == 0

    def _put(self, item: StreamUpdate | BaseException) -> None:
        self._pending.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[StreamUpdate]:
        if self._num_open == 0:
            raise StopAsyncIteration
        if not self._pending:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except BaseException:  # cancelled while waiting: the reader is gone
                self.abort()
                raise
            finally:
                self._waiter = None
        items, self._pending = self._pending, []
        if len(items) == 1 and isinstance(items[0], StreamUpdate):  # the usual case
            if items[0].finish_reason is not None:
                self._num_open -= 1
            return items
        merged: dict[int, StreamUpdate] = {}
        for item in items:
            if isinstance(item, BaseException):
                self.abort()
                raise item
            if item.finished:
                self._num_open -= 1
            prev = merged.get(item.index)
            merged[item.index] = item if prev is None else _merge(prev, item)
        return [merged[i] for i in sorted(merged)]

    def abort(self) -> None:
        """Stop every unfinished sample now (idempotent)."""
        if self._aborted or self._num_open == 0:
            return
        self._aborted = True
        self._num_open = 0
        self.engine._abort(self)


def _merge(a: StreamUpdate, b: StreamUpdate) -> StreamUpdate:
    logprobs = None if a.logprobs is None else a.logprobs + (b.logprobs or [])
    return StreamUpdate(
        b.index, a.text + b.text, a.token_ids + b.token_ids, logprobs, b.finish_reason,
        b.num_prompt_tokens, b.num_output_tokens,
    )  # fmt: skip


class AsyncLLM:
    """An `LLM` stepped by a background thread for callers on one asyncio event loop.

    ``async with AsyncLLM(llm) as engine:`` (or `start()` / `close()` from the loop) runs
    the engine thread; `add_request` queues work from the loop. The `LLM` stays the
    caller's to close, after this. `stats` is the engine's state after its latest step.
    """

    def __init__(
        self,
        llm: LLM,
        max_waiting: int | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 or None, got {max_waiting}")
        self.llm = llm
        self.max_waiting = max_waiting
        self.observer = observer or RequestObserver()
        self.stats = self._snapshot(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._commands: list[tuple[str, object]] = []  # guarded by _cv
        self._stopping = False
        self._error: BaseException | None = None  # why the engine thread died
        self._samples: dict[str, _Sample] = {}  # engine request id -> sample (loop side)
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        if self._thread is not None:
            raise RuntimeError("AsyncLLM is already started")
        self._loop = asyncio.get_running_loop()
        # CUDA's current device is per thread: the engine thread uses the one the LLM was
        # built under (rank 0 runs on the current device).
        cuda_device = None
        if self.llm.config.device_type == "cuda":
            import torch

            cuda_device = torch.cuda.current_device()
        self._thread = threading.Thread(
            target=self._run, args=(cuda_device,), name="hf2paged-engine", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        """Abort every request and stop the engine thread (the `LLM` stays open)."""
        thread = self._thread
        if thread is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify()
        await asyncio.to_thread(thread.join)
        self._fail_all(EngineError("the engine was shut down"))

    async def __aenter__(self) -> AsyncLLM:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def is_running(self) -> bool:
        """Whether the engine thread is alive and accepting requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: Prompt | CheckedRequest,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        n: int = 1,
        detokenize: bool = True,
    ) -> RequestStream:
        """Queue `n` samples of one prompt (text, token ids, or an `LLM.check_request`
        result) and return their stream. Raises ValueError for a bad request,
        `EngineOverloaded` when the waiting queue is full and `EngineError` when the engine
        is not running. ``detokenize=False`` leaves the text of updates empty until the
        sample finishes (for callers that read only the final text)."""
        if not self.is_running:
            raise EngineError(self._dead_message())
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
            checked = self.llm.check_request(prompt, sampling_params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(self, request_id, checked.prompt_token_ids, n)
        params = checked.sampling_params
        holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        adds = []
        for i in range(n):
            engine_id = request_id if n == 1 else f"{request_id}#{i}"
            sample = _Sample(engine_id, i, stream, holdback)
            stream.samples.append(sample)
            self._samples[engine_id] = sample
            adds.append((replace(checked, sampling_params=params.for_sample(i)), engine_id))
        self._streams[request_id] = stream
        self._send([("add", (c, engine_id, detokenize)) for c, engine_id in adds])
        return stream

    @property
    def num_waiting(self) -> int:
        """Requests waiting for the engine: queued in its scheduler or handed to it."""
        with self._cv:
            pending = sum(1 for kind, _ in self._commands if kind == "add")
        return self.stats.num_waiting + pending

    def _abort(self, stream: RequestStream) -> None:
        ids = []
        for sample in stream.samples:
            if not sample.finished:
                sample.finished = True
                self._samples.pop(sample.engine_id, None)
                self._finished(sample, "abort")
                ids.append(sample.engine_id)
        self._streams.pop(stream.request_id, None)
        if ids:
            self._cancel(ids)

    def _cancel(self, engine_ids: list[str]) -> None:
        """Abort engine requests: those the engine thread has not taken yet are dropped
        from its queue, the others are aborted there before its next step."""
        cancel = set(engine_ids)
        with self._cv:
            pending = [c for c in self._commands if c[0] == "add" and c[1][1] in cancel]
            for command in pending:
                self._commands.remove(command)
                cancel.discard(command[1][1])
            if cancel:
                self._commands.extend(("abort", engine_id) for engine_id in cancel)
                self._cv.notify()

    def _send(self, commands: list[tuple[str, object]]) -> None:
        with self._cv:
            self._commands.extend(commands)
            self._cv.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self, cuda_device: int | None) -> None:
        llm = self.llm
        try:
            if cuda_device is not None:
                import torch

                torch.cuda.set_device(cuda_device)
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or llm.has_unfinished_requests()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                    # Under the lock, so `num_waiting` never sees an add in neither place.
                    failed = self._apply(commands)
                    self.stats = self._snapshot(self.stats.num_steps)
                if stopping:
                    llm.abort_all()
                    self.stats = self._snapshot(self.stats.num_steps)
                    return
                outputs: list[TokenDelta] = []
                if llm.has_unfinished_requests():
                    try:
                        outputs = llm.step_tokens()
                    except Exception as exc:  # noqa: BLE001 — fail the requests, keep serving
                        log.exception("engine step failed; failing its requests")
                        failed += [(request_id, exc) for request_id in llm.abort_all()]
                now = time.perf_counter()
                self.stats = self._snapshot(self.stats.num_steps + bool(outputs))
                if outputs or failed:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, now, failed)
        except BaseException as exc:  # a bug, or the event loop closed under us
            self._error = exc
            log.exception("the engine thread stopped")
            try:
                self._loop.call_soon_threadsafe(self._fail_all, EngineError(self._dead_message()))
            except RuntimeError:  # the loop is closed
                pass

    def _apply(self, commands: list[tuple[str, object]]) -> list[tuple[str, BaseException]]:
        """Apply adds and aborts on the engine thread; returns the adds that failed."""
        failed = []
        for kind, arg in commands:
            if kind == "add":
                checked, engine_id, detokenize = arg
                try:
                    self.llm.add_checked_request(checked, engine_id, detokenize)
                except ValueError as exc:
                    failed.append((engine_id, exc))
            else:
                self.llm.abort_request(arg)
        return failed

    def _snapshot(self, num_steps: int) -> EngineStats:
        scheduler = self.llm.scheduler
        blocks = self.llm.block_manager
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_free_blocks=blocks.num_free_blocks,
            num_blocks=blocks.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            num_steps=num_steps,
        )

    # ------------------------------------------------------------------ event loop
    def _deliver(
        self,
        deltas: list[TokenDelta],
        step_time: float,
        failed: list[tuple[str, BaseException]],
    ) -> None:
        first_latencies: list[float] = []
        gaps: list[float] = []
        for delta in deltas:
            sample = self._samples.get(delta.request_id)
            if sample is None:  # aborted while the step ran
                continue
            if sample.last_token_time is None:
                first_latencies.append(step_time - sample.arrival)
            else:
                gaps.append(step_time - sample.last_token_time)
            sample.last_token_time = step_time
            sample.num_tokens = delta.num_output_tokens
            text = delta.text
            finished = delta.finish_reason is not None
            end = len(text) if finished else len(text) - sample.holdback
            if end > sample.num_chars:
                text, sample.num_chars = text[sample.num_chars : end], end
            else:
                text = ""
            update = StreamUpdate(
                sample.index, text, [delta.token_id],
                None if delta.logprobs is None else [delta.logprobs], delta.finish_reason,
                sample.num_prompt_tokens, sample.num_tokens,
            )  # fmt: skip
            if finished:
                self._close_sample(sample, delta.finish_reason)
            sample.stream._put(update)
        if first_latencies or gaps:
            self.observer.on_step(first_latencies, gaps)
        for engine_id, exc in failed:
            sample = self._samples.get(engine_id)
            if sample is not None:
                self._fail(sample.stream, exc)

    def _close_sample(self, sample: _Sample, finish_reason: str) -> None:
        sample.finished = True
        self._samples.pop(sample.engine_id, None)
        self._finished(sample, finish_reason)
        stream = sample.stream
        if all(s.finished for s in stream.samples):
            self._streams.pop(stream.request_id, None)

    def _finished(self, sample: _Sample, finish_reason: str) -> None:
        self.observer.on_finished(
            finish_reason, sample.num_prompt_tokens, sample.num_tokens,
            time.perf_counter() - sample.arrival,
        )  # fmt: skip

    def _fail(self, stream: RequestStream, exc: BaseException) -> None:
        """End `stream` with `exc`: its reader raises it; its other samples are aborted."""
        error = exc if isinstance(exc, (ValueError, EngineError)) else EngineError(str(exc))
        stream._put(error)
        for sample in stream.samples:
            if not sample.finished:
                sample.finished = True
                self._samples.pop(sample.engine_id, None)
                self._finished(sample, "error")
        self._streams.pop(stream.request_id, None)
        if self.is_running:
            self._cancel([s.engine_id for s in stream.samples])

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            self._fail(stream, exc)

    def _dead_message(self) -> str:
        if self._error is not None:
            return f"the engine stopped: {type(self._error).__name__}: {self._error}"
        if self._thread is None:
            return "the engine is not started"
        return "the engine is shut down"
