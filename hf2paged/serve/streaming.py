"""Disconnect-aware responses: a client that goes away cancels the work done for it.

Cancelling the coroutine (or the generator) that reads a `RequestStream` aborts the
engine request, which frees its KV blocks before the next step. `EventStream` and
`until_disconnected` watch the connection themselves rather than relying on the ASGI
server's version-dependent behaviour (uvicorn's ASGI 2.3 lets Starlette listen; under
2.4 a disconnect surfaces only at the next write, which a queued request never makes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from runtime.engine.async_llm import RequestStream, StreamUpdate

T = TypeVar("T")


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """``(True, result)`` when `work` finishes, ``(False, None)`` when the client
    disconnected first (`work` is then cancelled). An exception of `work` is raised as
    itself (not inside an ExceptionGroup)."""
    done = False
    result = None
    error: Exception | None = None
    async with anyio.create_task_group() as group:

        async def run() -> None:
            nonlocal done, result, error
            try:
                result = await work
                done = True
            except Exception as exc:  # noqa: BLE001 — raised again below, unwrapped
                error = exc
            group.cancel_scope.cancel()

        async def watch() -> None:
            await _wait_for_disconnect(request.receive)
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if error is not None:
        raise error
    return done, result


class EventStream(Response):
    """`text/event-stream` from an async iterator of already formatted events; stops
    (closing the iterator) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], headers: dict[str, str] | None = None):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                    )
                    async for event in self.events:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": event.encode(),
                                "more_body": True,
                            }
                        )
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the client is gone (ASGI 2.4 servers raise on write)
                    pass
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.events.aclose()  # aborts what the events were reading
                group.cancel_scope.cancel()

            async def watch() -> None:
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(watch)


async def merge(
    streams: list[RequestStream],
) -> AsyncIterator[tuple[int, list[StreamUpdate]]]:
    """The updates of several requests as ``(position in streams, updates)``, in arrival
    order. Leaving early aborts every request; an error in one ends all of them."""
    if len(streams) == 1:
        try:
            async for updates in streams[0]:
                yield 0, updates
        finally:
            streams[0].abort()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for updates in stream:
                queue.put_nowait((i, updates))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 — handed to the reader
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()
