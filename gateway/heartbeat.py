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
    request is queued or in prefill.  One timer per waiting stream, armed for when the next beat is due and
    stopped when tokens flow or the request ends: a stream whose first token comes in time costs one timer
    that never fires."""

    __slots__ = (
        "comment", "handle", "interval", "last", "loop", "request", "request_id", "response", "sending", "stopped",
        "waiter",
    )  # fmt: skip

    def __init__(self, request: web.Request, request_id: str, interval: float, start: float) -> None:
        self.request = request
        self.request_id = request_id
        self.interval = interval
        self.last = start  # when the client last got a byte (its arrival, before any)
        self.response: web.StreamResponse | None = None  # prepared at the first heartbeat
        self.comment: Callable[[], str] | None = None  # what a beat says now: the state of the last wait begun
        self.loop = asyncio.get_running_loop()
        self.waiter = asyncio.current_task()  # the request's task: cancelled when a beat finds the client gone
        self.sending: asyncio.Task[None] | None = None  # the beat being written: held, the loop keeps tasks weakly
        self.stopped = False
        self.handle: asyncio.TimerHandle | None = None
        self._arm()

    def wrote(self) -> None:
        """Bytes reached the client (the engine's own keep-alive comment too): the next beat is due later."""
        self.last = perf_counter()

    async def wait(self, aw: Awaitable[T], comment: Callable[[], str]) -> T:
        """Await ``aw`` in this task; a beat due meanwhile (or until the next wait) writes ``: <comment()>``, and
        a client gone by then cancels this task, as any client that leaves does."""
        self.comment = comment
        return await aw

    def stop(self) -> None:
        """Tokens flow, or the request ended: no more beats."""
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    async def beat(self, text: str) -> None:
        # prepare() does not yield (no hook of the gateway's awaits), so the request's task never sees a response
        # half prepared here
        response = self.response
        if response is None:
            response = web.StreamResponse(status=200, headers=(*_HEADERS, (REQUEST_ID, self.request_id)))
            await response.prepare(self.request)
            self.response = response
        await response.write(f": {text}\n\n".encode())
        self.wrote()

    def _arm(self, delay: float | None = None) -> None:
        if delay is None:
            delay = max(self.last + self.interval - perf_counter(), 0.0)
        self.handle = self.loop.call_later(delay, self._due)

    def _due(self) -> None:
        self.handle = None
        if self.comment is None:  # no wait has begun yet (the first begins as the heartbeat is made)
            self._arm(self.interval)
        elif self.last + self.interval > perf_counter():  # a byte went out meanwhile
            self._arm()
        else:
            self.sending = self.loop.create_task(self._send(self.comment()))

    async def _send(self, text: str) -> None:
        try:
            await self.beat(text)
        except Exception as exc:  # the client is gone: its request ends as any whose client leaves
            if not isinstance(exc, ConnectionError):
                log.exception("request %s: the heartbeat failed", self.request_id)
            if self.waiter is not None:
                self.waiter.cancel()
            return
        if not self.stopped:
            self._arm()
