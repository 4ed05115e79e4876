"""The streaming contract of long requests: SSE comments while a stream waits for its first token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TypeVar

from aiohttp import web

from gateway.errors import REQUEST_ID

T = TypeVar("T")

_HEADERS = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))


class Heartbeat:
    """One stream's wait for its first token.  Until ``interval`` seconds have passed nothing is sent, so fast
    errors keep their status; then the 200 and SSE headers go out, and a comment every interval while the
    request is queued or in prefill.  Only waits run timers: once tokens flow, nothing is armed."""

    __slots__ = ("interval", "last", "request", "request_id", "response")

    def __init__(self, request: web.Request, request_id: str, interval: float, start: float) -> None:
        self.request = request
        self.request_id = request_id
        self.interval = interval
        self.last = start  # when the client last got a byte (its arrival, before any)
        self.response: web.StreamResponse | None = None  # prepared at the first heartbeat

    def wrote(self) -> None:
        """Bytes reached the client (the engine's own keep-alive comment too): the next beat is due later."""
        self.last = perf_counter()

    async def wait(self, aw: Awaitable[T], comment: Callable[[], str], undo: Callable[[T], object] | None = None) -> T:
        """Await ``aw``, writing ``: <comment()>`` each time the client has had no byte for an interval.
        If the wait fails (the client left) just as ``aw`` succeeded, ``undo`` gives its result back."""
        future = asyncio.ensure_future(aw)
        try:
            while True:
                due = self.last + self.interval - perf_counter()
                if due > 0:
                    done, _ = await asyncio.wait((future,), timeout=due)
                    if done:
                        return future.result()
                    continue
                await self.beat(comment())
        except BaseException:
            if not future.cancel() and undo is not None and not future.cancelled() and future.exception() is None:
                undo(future.result())
            raise

    async def beat(self, text: str) -> None:
        response = self.response
        if response is None:
            response = web.StreamResponse(status=200, headers=(*_HEADERS, (REQUEST_ID, self.request_id)))
            await response.prepare(self.request)
            self.response = response
        await response.write(f": {text}\n\n".encode())
        self.wrote()
