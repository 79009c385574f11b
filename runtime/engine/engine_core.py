"""`EngineCore`: the loop that steps an `LLM` for a front end, and the messages between them.

The front end (`AsyncLLM`, on an asyncio event loop) sends batches of commands: requests
to add, requests to abort, and at the end a stop. The core applies every batch that has
arrived before each step, steps the running batch (continuous batching across all
callers) and emits one `CoreOutput` per step: each request's new token, its logprobs and
finish reason, the requests that failed, and the engine's stats. Text is not made here:
the front end detokenizes and matches stop strings (the core's requests carry none; a
stop-string hit comes back as an abort), so the engine's own time goes to the model.

The same loop runs on a thread of the caller's process (`EngineThread`, for the Python
API) or in a process of its own (`runtime.engine.engine_process.EngineProcess`, for the
server: there the engine's Python work and the HTTP side's never wait for one
interpreter lock). Messages are tuples of plain values, cheap to pickle.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.engine.loading import CheckedRequest, RequestChecker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after its latest step (read by metrics and health checks)."""

    num_running: int = 0
    num_waiting: int = 0  # queued in the scheduler
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    num_steps: int = 0


@dataclass(frozen=True)
class EngineInfo:
    """What a front end needs to know of a loaded engine: enough to check requests
    (`checker`) and to describe the model."""

    model: Path
    trust_remote_code: bool
    vocab_size: int
    max_model_len: int  # prompt + output, in tokens
    limits: str  # what bounds max_model_len, for the too-long message
    block_size: int
    num_blocks: int

    @classmethod
    def of(cls, llm) -> EngineInfo:
        checker: RequestChecker = llm.checker
        return cls(
            llm.config.model, llm.config.trust_remote_code, checker.vocab_size,
            checker.max_model_len, checker.limits, llm.config.block_size,
            llm.block_manager.num_blocks,
        )  # fmt: skip

    def checker(self) -> RequestChecker:
        """A request checker with the model's tokenizer, loaded in this process."""
        return RequestChecker.for_model(
            self.model, self.vocab_size, self.max_model_len, self.limits, self.trust_remote_code
        )


@dataclass
class CommandBatch:
    """Commands of the front end, applied in this order before the core's next step."""

    serial: int  # increasing; outputs report the latest applied (`CoreOutput.applied`)
    adds: list[tuple[str, CheckedRequest]]  # (engine request id, request)
    aborts: list[str]
    stop: bool = False


@dataclass
class CoreOutput:
    """One step's results (or, with no rows, the stats after applying commands)."""

    applied: int  # serial of the latest command batch applied before these stats
    stats: EngineStats
    # (engine request id, token id, logprobs or None, finish reason or None) per request
    # that produced a token, in the order the engine returned them.
    rows: list[tuple[str, int, tuple | None, str | None]]
    # (engine request id, whether the request was bad (ValueError), message)
    failed: list[tuple[str, bool, str]]
    died: str | None = None  # the core stopped on an unexpected error: why


class EngineCore:
    """Steps `llm` on the commands from `inbox` until a stop; `emit` gets every output.
    `llm` is driven through its public stepping API only (`add_checked_request`,
    `abort_request`, `abort_all`, `has_unfinished_requests`, `step_tokens`)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.num_steps = 0
        self.applied = 0

    def run(self, inbox: queue.SimpleQueue, emit: Callable[[CoreOutput], None]) -> None:
        llm = self.llm
        try:
            while True:
                # Block only when there is nothing to step.
                batches = [] if llm.has_unfinished_requests() else [inbox.get()]
                while True:
                    try:
                        batches.append(inbox.get_nowait())
                    except queue.Empty:
                        break
                failed: list[tuple[str, bool, str]] = []
                stop = False
                for batch in batches:
                    failed += self._apply(batch)
                    stop = stop or batch.stop
                if stop:
                    llm.abort_all()
                    emit(CoreOutput(self.applied, self.stats(), [], failed))
                    return
                rows = []
                if llm.has_unfinished_requests():
                    try:
                        rows = [
                            (d.request_id, d.token_id, d.logprobs, d.finish_reason)
                            for d in llm.step_tokens()
                        ]
                    except Exception as exc:  # noqa: BLE001 — fail the requests, keep serving
                        log.exception("engine step failed; failing its requests")
                        message = str(exc) or type(exc).__name__
                        failed += [(rid, False, message) for rid in llm.abort_all()]
                    self.num_steps += bool(rows)
                if rows or failed or batches:
                    emit(CoreOutput(self.applied, self.stats(), rows, failed))
        except BaseException as exc:  # a bug: the front end fails everything it waits for
            log.exception("the engine core stopped")
            emit(CoreOutput(self.applied, self.stats(), [], [], f"{type(exc).__name__}: {exc}"))

    def _apply(self, batch: CommandBatch) -> list[tuple[str, bool, str]]:
        failed = []
        for request_id, request in batch.adds:
            try:
                self.llm.add_checked_request(request, request_id, detokenize=False)
            except ValueError as exc:
                failed.append((request_id, True, str(exc)))
        for request_id in batch.aborts:
            self.llm.abort_request(request_id)
        self.applied = max(self.applied, batch.serial)
        return failed

    def stats(self) -> EngineStats:
        scheduler, blocks = self.llm.scheduler, self.llm.block_manager
        return EngineStats(
            len(scheduler.running), len(scheduler.waiting), blocks.num_free_blocks,
            blocks.num_blocks, scheduler.num_preemptions, self.num_steps,
        )  # fmt: skip


class EngineThread:
    """The core on a thread of this process, stepping an `LLM` the caller built (and
    closes). For the Python API and tests: simple, but the engine's Python work and the
    event loop's share one interpreter lock (a server wants `EngineProcess`)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.info = EngineInfo.of(llm)
        self.checker = llm.checker
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(
        self, on_output: Callable[[CoreOutput], None], on_exit: Callable[[str], None]
    ) -> None:
        """Start stepping; `on_output` is called on the running event loop (a core that
        stops on an error says so in its last output: `on_exit` is never called)."""
        import asyncio

        loop = asyncio.get_running_loop()
        # CUDA's current device is per thread: the engine thread uses the one the LLM was
        # built under (rank 0 runs on the current device).
        cuda_device = None
        if self.llm.config.device_type == "cuda":
            import torch

            cuda_device = torch.cuda.current_device()

        def emit(output: CoreOutput) -> None:
            try:
                loop.call_soon_threadsafe(on_output, output)
            except RuntimeError:  # the loop is closed: nobody reads
                pass

        def run() -> None:
            if cuda_device is not None:
                import torch

                torch.cuda.set_device(cuda_device)
            EngineCore(self.llm).run(self._inbox, emit)

        self._thread = threading.Thread(target=run, name="hf2paged-engine", daemon=True)
        self._thread.start()

    def send(self, batch: CommandBatch) -> None:
        self._inbox.put(batch)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def exit_reason(self) -> str:
        return "the engine thread stopped"

    async def join(self) -> None:
        """Wait for the core to return (after a batch with `stop`)."""
        import asyncio

        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def close(self) -> None:
        """Nothing to release: the `LLM` stays the caller's."""
