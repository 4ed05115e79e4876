"""The streaming contract of long requests: SSE comments while a stream waits for its first token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TypeVar

from aiohttp import web

from gateway.errors import REQUEST_ID

T = TypeVar("T")
log = logging.getLogger("gateway.heartbeat")

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

    async def wait(self, aw: Awaitable[T], comment: Callable[[], str]) -> T:
        """Await ``aw`` in this task while a timer writes ``: <comment()>`` each time the client has had no byte
        for an interval; a client gone by then cancels this task, as any client that leaves does."""
        ticker = _Ticker(self, comment)
        try:
            return await aw
        finally:
            ticker.stop()

    async def beat(self, text: str) -> None:
        response = self.response
        if response is None:
            response = web.StreamResponse(status=200, headers=(*_HEADERS, (REQUEST_ID, self.request_id)))
            await response.prepare(self.request)
            self.response = response
        await response.write(f": {text}\n\n".encode())
        self.wrote()


class _Ticker:
    """The timer of one wait: armed for when the next beat is due, which it sends from a task of its own."""

    __slots__ = ("beat", "comment", "handle", "loop", "sending", "stopped", "waiter")

    def __init__(self, beat: Heartbeat, comment: Callable[[], str]) -> None:
        self.beat = beat
        self.comment = comment
        self.loop = asyncio.get_running_loop()
        self.waiter = asyncio.current_task()
        self.handle: asyncio.TimerHandle | None = None
        self.sending: asyncio.Task[None] | None = None
        self.stopped = False
        self._arm()

    def _arm(self) -> None:
        due = self.beat.last + self.beat.interval - perf_counter()
        self.handle = self.loop.call_later(max(due, 0.0), self._due)

    def _due(self) -> None:
        self.handle = None
        if self.beat.last + self.beat.interval > perf_counter():  # a byte went out meanwhile
            self._arm()
        else:
            self.sending = self.loop.create_task(self._send())

    async def _send(self) -> None:
        try:
            await self.beat.beat(self.comment())
        except Exception as exc:  # the client is gone: its request ends as any whose client leaves
            if not isinstance(exc, ConnectionError):
                log.exception("request %s: the heartbeat failed", self.beat.request_id)
            if self.waiter is not None:
                self.waiter.cancel()
            return
        if not self.stopped:
            self._arm()

    def stop(self) -> None:
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
