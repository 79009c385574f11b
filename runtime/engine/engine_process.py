"""`EngineProcess`: the engine core in a process of its own (vLLM V1's split).

An HTTP server and an engine in one interpreter take turns on its lock: every streamed
token's JSON, socket write and task switch waits while the engine does its Python work
for a step (scheduling, inputs, sampling bookkeeping; milliseconds at batch 256), and
that work waits for the server. Here the engine runs `EngineCore` in a spawned process
(which spawns its own tensor-parallel ranks, as `LLM` does); the server's process keeps
only what is cheap per request: checking and tokenizing, detokenizing and stop strings
(`AsyncLLM`), HTTP.

The two talk over one socket pair, each message a pickle behind its length. The front
end reads and writes through an asyncio transport (never blocking its event loop: the
engine's outputs are taken as they arrive, commands are buffered until the socket takes
them); in the engine process a receiving thread feeds the core's inbox and a sending
thread writes its outputs, so the stepping loop never waits on the socket. The engine
process ignores SIGINT (the server decides when it stops) and stops when the front end
sends a stop or goes away (end of file on the socket).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import pickle
import queue
import select
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from runtime.engine.engine_core import CommandBatch, CoreOutput, EngineCore, EngineInfo

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30
_HEADER = 8  # bytes of a message's length, big-endian


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_HEADER, "big") + data


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the other side closed the socket")
        got += k
    return bytes(buf)


def _recv_message(sock: socket.socket) -> Any:
    """The next message on a blocking socket (EOFError at its end)."""
    n = int.from_bytes(_recv_exactly(sock, _HEADER), "big")
    return pickle.loads(_recv_exactly(sock, n))


class _Messages(asyncio.Protocol):
    """The front end's end of the socket: whole messages to `on_message`, then
    `on_lost()` when the engine's end closes."""

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER:
            end = start + _HEADER + int.from_bytes(buffer[start : start + _HEADER], "big")
            if len(buffer) < end:
                break
            message = pickle.loads(memoryview(buffer)[start + _HEADER : end])
            start = end
            self.on_message(message)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()


class EngineProcess:
    """Spawns a process that builds an engine with `make_llm()` (a picklable callable: an
    `LLM` or anything with its stepping API) and steps it; returns once it is loaded.
    A load failure raises the engine's own exception (a ValueError for a bad model
    directory, as `LLM` raises it). `log_level`: the engine process's logging level
    (default: this process's)."""

    def __init__(self, make_llm: Callable[[], Any], *, log_level: int | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._sock, child = socket.socketpair()
        if log_level is None:
            log_level = logging.getLogger().getEffectiveLevel()
        self.process = ctx.Process(
            target=_engine_main, args=(make_llm, child, log_level), name="hf2paged-engine"
        )
        self.process.start()
        child.close()
        self._transport: asyncio.Transport | None = None
        self._unsent: list[bytes] = []  # commands sent before the transport was ready
        self._closed = False
        self._loaded = False
        atexit.register(self.shutdown)  # never leave a non-daemonic child behind
        try:
            self.info: EngineInfo = self._wait_ready()
            self.checker = self.info.checker()  # tokenizer loaded in this process too
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self) -> EngineInfo:
        exited = RuntimeError(
            "the engine process exited while loading the model (its output is above)"
        )
        while not select.select([self._sock], [], [], 0.2)[0]:
            if not self.process.is_alive():
                raise exited
        try:
            kind, payload = _recv_message(self._sock)
        except (EOFError, OSError):
            raise exited from None
        if kind == "failed":
            raise payload
        self._loaded = True
        return payload

    # ------------------------------------------------------------------ the front end's side
    def start(
        self, on_output: Callable[[CoreOutput], None], on_exit: Callable[[str], None]
    ) -> None:
        """Deliver the engine's outputs to `on_output` on the running event loop;
        `on_exit(reason)` if the engine process goes away unasked."""
        loop = asyncio.get_running_loop()

        def lost() -> None:
            self._transport = None
            if not self._closed:
                self.process.join(timeout=1)
                on_exit(self.exit_reason())

        async def connect() -> None:
            self._sock.setblocking(False)
            transport, _ = await loop.create_unix_connection(
                lambda: _Messages(on_output, lost), sock=self._sock
            )
            self._transport = transport
            for frame in self._unsent:
                transport.write(frame)
            self._unsent = []

        self._connecting = loop.create_task(connect())

    def send(self, batch: CommandBatch) -> None:
        frame = _frame(batch)
        if self._transport is not None:
            self._transport.write(frame)  # buffered by the transport: never blocks
        elif not self._closed:
            self._unsent.append(frame)

    @property
    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_reason(self) -> str:
        """Why the engine process is gone, in words (for a process that exited unasked)."""
        code = self.process.exitcode
        if code is None:
            how = "closed its connection"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"the engine process (pid {self.process.pid}) {how}"

    async def join(self) -> None:
        """Wait for the engine process to finish (after a batch with `stop`)."""
        await asyncio.to_thread(self.process.join, JOIN_TIMEOUT_S)
        self.shutdown()

    def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine process now, whatever it is doing (idempotent): closing the
        socket stops it (it aborts its requests and stops its TP ranks)."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._sock.close()
        if self._loaded:  # it stops on the closed socket: aborts, stops its TP ranks
            self.process.join(timeout=JOIN_TIMEOUT_S)
        elif self.process.is_alive():  # still loading (Ctrl-C at start-up): don't wait
            self.process.terminate()
            self.process.join(timeout=JOIN_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("the engine process did not stop; terminating it")
            self.process.terminate()
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        atexit.unregister(self.shutdown)


# ---------------------------------------------------------------------- the engine's side
def _engine_main(make_llm: Callable[[], Any], sock: socket.socket, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    # terminate() (the front end stopping while the model loads): unwind, so the TP ranks
    # started so far are stopped too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        llm = make_llm()
    except Exception as exc:  # noqa: BLE001 — the front end raises it
        try:
            sock.sendall(_frame(("failed", _picklable(exc))))
        except OSError:  # the front end is gone
            pass
        return
    try:
        try:
            sock.sendall(_frame(("ready", EngineInfo.of(llm))))
        except OSError:  # the front end stopped while the model loaded
            return
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_receive, args=(sock, inbox), daemon=True).start()
        sender = threading.Thread(target=_send, args=(sock, outbox), daemon=True)
        sender.start()
        EngineCore(llm).run(inbox, outbox.put)
        outbox.put(None)
        sender.join(timeout=JOIN_TIMEOUT_S)
    finally:
        llm.close()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _receive(sock: socket.socket, inbox: queue.SimpleQueue) -> None:
    while True:
        try:
            batch = _recv_message(sock)
        except (EOFError, OSError):  # the front end is gone: stop
            inbox.put(CommandBatch(0, [], [], stop=True))
            return
        inbox.put(batch)


def _send(sock: socket.socket, outbox: queue.SimpleQueue) -> None:
    while (output := outbox.get()) is not None:
        try:
            sock.sendall(_frame(output))
        except OSError:  # the front end is gone; the receiver stops the core
            return


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 — an exception type only the engine process knows
        return RuntimeError(f"{type(exc).__name__}: {exc}")
