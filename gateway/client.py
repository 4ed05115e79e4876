"""The request path's HTTP/1.1 client to the engines: keep-alive connections, one write per request, C-parsed answers.

aiohttp's ``ClientSession`` builds a ``ClientRequest``, parses the URL, computes default headers and
wraps the answer in three objects for every request: about a fifth of the gateway's CPU per small
request (bench/README.md).  The gateway already holds the method, target, filtered headers and body,
so this client writes them as one pre-built buffer on a pooled connection and parses the answer with
llhttp (``httptools``) straight into a buffer of body chunks that the relay drains.  Health checks and
engine scrapes, which are not on the request path, keep using aiohttp's client.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, cast
from urllib.parse import unquote, urlsplit

import httptools
from multidict import CIMultiDict

# vLLM (uvicorn) closes idle keep-alive connections after 5 s; reusing one at that moment gets a reset.
KEEPALIVE_TIMEOUT = 4.0
_HIGH_WATER = 1 << 18  # body bytes buffered from the engine before reading from it pauses
_ONE_WRITE_MAX = 1 << 16  # head and body concatenated into one send below this body size
_BODY_SLICE = 1 << 18  # a large body is written a slice at a time, as the engine reads it: never copied whole
# A reused connection lost this soon after the request went out, before a byte of the answer, is most
# likely the race with the engine's idle close.  Only an idempotent request is sent again then: a POST
# (a generation) may have reached the engine, and is never sent twice.
STALE_WINDOW = 0.5
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))  # RFC 9110 §9.2.2


class Reader(Protocol):
    """A protocol that ``EngineConnection.hand_over`` lends the connection's reads to (gateway/_splice.c's)."""

    last: float  # when it last read bytes of the answer, on perf_counter's clock

    def data_received(self, data: bytes) -> None: ...


class EngineUnreachable(Exception):
    """No connection could be opened: nothing was sent, another engine may take the request."""


class GatewayExhausted(Exception):
    """The gateway itself is out of file descriptors or memory: no fault of the engine's, whose health stays."""


# connect() failures that are this process's or this host's, not the engine's
LOCAL_EXHAUSTION = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))


class EngineError(Exception):
    """The engine failed a request after the connection was open."""


class EngineTimeout(EngineError):
    """The engine was silent for longer than the read timeout."""


class EngineBrokeOff(EngineError):
    """The engine closed the connection, or sent what is not HTTP, before its answer was complete."""


class EngineAborted(EngineBrokeOff):
    """The gateway itself cut the answer off (the drain's deadline): the engine did nothing wrong."""


class _Stale(EngineBrokeOff):
    """A reused keep-alive connection closed at once, before a byte of the answer (see STALE_WINDOW)."""


class Origin:
    """Where one engine listens, and its idle keep-alive connections."""

    __slots__ = ("authorization", "closed", "host", "host_header", "idle", "open", "port", "prefix", "ssl", "sweep")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.ssl else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.prefix = parts.path.rstrip("/")
        self.authorization: str | None = None  # credentials in the URL replace the client's Authorization
        if parts.username is not None:
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(userinfo.encode()).decode()
        # an ordered set: least recently used first, popitem() takes the most recent, removal is O(1)
        self.idle: dict[EngineConnection, None] = {}
        self.open: set[EngineConnection] = set()  # idle or carrying an answer
        self.sweep: asyncio.TimerHandle | None = None  # closes idle connections as they expire
        self.closed = False

    def keep(self, conn: EngineConnection) -> None:
        conn.idle_since = time.monotonic()
        self.idle[conn] = None
        if self.sweep is None:
            self.sweep = conn.loop.call_later(KEEPALIVE_TIMEOUT, self._sweep, conn.loop)

    def take(self) -> EngineConnection | None:
        """The most recently used idle connection that is still open, after closing the expired ones
        (the sweep may not have run yet)."""
        idle = self.idle
        self.expire(time.monotonic() - KEEPALIVE_TIMEOUT)
        while idle:
            conn = idle.popitem()[0]
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
            conn.close()
        return None

    def expire(self, before: float) -> None:
        """Close the connections idle since before ``before``, least recently used first."""
        idle = self.idle
        while idle:
            conn = next(iter(idle))
            if conn.idle_since > before:
                return
            del idle[conn]
            conn.close()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sweep = None
        now = time.monotonic()
        self.expire(now - KEEPALIVE_TIMEOUT)
        if self.idle:  # the oldest left expires later
            delay = next(iter(self.idle)).idle_since + KEEPALIVE_TIMEOUT - now
            self.sweep = loop.call_later(max(delay, 0.0) + 0.001, self._sweep, loop)

    def close(self) -> None:
        self.closed = True
        if self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class EngineConnection(asyncio.Protocol):
    """One connection to an engine; between sending a request and release it is also that request's answer."""

    def __init__(self, origin: Origin, read_timeout: float) -> None:
        self.origin = origin
        self.read_timeout = read_timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.reused = False
        self.sent_at = 0.0
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None  # the read timeout's, armed once per answer
        self._waiting_since = 0.0
        self._reader: Reader | None = None  # while hand_over() has lent the reads out
        self._parser = httptools.HttpResponseParser(self)  # llhttp reads one answer after another
        self._new_answer()

    def _new_answer(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_type = ""
        self.content_length: int | None = None
        self._raw_headers: list[tuple[str, str]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._head_only = False
        self._interim = False
        self._got_bytes = False
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._error: EngineError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None  # while pump() relays the body from data_received
        self._boundary = False  # llhttp is between two chunks of a chunked body

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.origin.open.add(self)

    def data_received(self, data: bytes) -> None:
        if self._complete:  # bytes after the answer (or while idle): not HTTP/1.1 as we spoke it
            self._keep_alive = False
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(EngineBrokeOff(f"the engine's answer is not valid HTTP: {exc}"))
            return
        sink = self._sink
        if sink is not None and self._chunks:
            self._waiting_since = self.loop.time()  # silence is measured from the last byte
            if not sink(self._take()):
                self._pause()
            elif not self._complete:
                return  # relayed from here: the pump's coroutine waits for the end only
        elif self._buffered > _HIGH_WATER:
            self._pause()
        self._wake()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        transport, self.transport = self.transport, None
        if transport is None:
            return
        self._disarm()
        self.origin.idle.pop(self, None)
        self.origin.open.discard(self)
        if self._complete or self._error is not None:
            self._wake()
        elif exc is None and self._headers_done and self.content_length is None and not self._chunked():
            self._complete = True  # an answer without a length ends when the connection does (cleanly)
            self._wake()
        elif not self._got_bytes and self.reused and self.loop.time() - self.sent_at < STALE_WINDOW:
            self._fail(_Stale("the engine closed the connection as it was reused (idle close, or the engine is gone)"))
        else:
            self._fail(EngineBrokeOff(f"the engine closed the connection mid-answer ({exc or 'EOF'})"))

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        # as aiohttp's own parser decodes them, so its server writes back the engine's bytes
        self._raw_headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: the answer follows
            self._raw_headers.clear()
            self.reason = ""
            self._interim = True
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        self.headers = headers = CIMultiDict(self._raw_headers)
        content_type = headers.get("Content-Type")
        if content_type:
            self.content_type = content_type.partition(";")[0].strip().lower()
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self._headers_done = True
        if self._head_only:
            # llhttp cannot be told the answer is to HEAD and would read the next answer as its body
            self._complete = True
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self._head_only:
            self._chunks.append(body)
            self._buffered += len(body)

    def on_chunk_header(self) -> None:
        self._boundary = False

    def on_chunk_complete(self) -> None:
        self._boundary = True

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    # -- the exchange --------------------------------------------------------------------------------

    async def send(self, head: bytes, body: bytes | bytearray | memoryview, *, head_only: bool) -> None:
        transport = self.transport
        assert transport is not None
        if self._headers_done:
            self._new_answer()  # kept alive: the last answer stays readable until the connection is reused
        self._head_only = head_only
        self.sent_at = self.loop.time()
        if not body:
            transport.write(head)
        elif len(body) < _ONE_WRITE_MAX:
            transport.write(head + body)
        else:
            transport.write(head)
            view = memoryview(body)
            for at in range(0, len(view), _BODY_SLICE):
                while True:
                    if self._error is not None:
                        raise self._error
                    if self._headers_done:  # it answered before reading the whole body
                        self._keep_alive = False
                        return
                    if not self._write_paused:
                        break
                    await self._wait()  # the engine reads slower than we write: wait, do not buffer
                transport.write(view[at : at + _BODY_SLICE])

    async def read_headers(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read_chunk(self) -> bytes:
        """The body as it arrives, every buffered piece at once; ``b""`` at its end."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        data = self._take()
        self._resume()
        return data

    async def pump(self, sink: Callable[[bytes], bool], drained: Callable[[], Awaitable[None]]) -> None:
        """Hand the rest of the body to ``sink`` from ``data_received`` itself, as it arrives: no task wake-up
        per piece.  ``sink`` returns False when its reader cannot take more (or is gone): reading from the
        engine pauses until ``drained()`` returns.  Returns at the body's end; raises the engine's failure
        (the read timeout included), or what ``drained`` raises."""
        self._sink = sink
        try:
            while True:
                if self._chunks and not sink(self._take()):
                    self._pause()
                if self._paused:
                    await drained()
                    self._resume()
                    continue
                if self._error is not None:
                    raise self._error
                if self._complete:
                    return
                await self._wait()
        finally:
            self._sink = None

    @property
    def complete(self) -> bool:
        """The whole answer has been read (some of it may still be buffered here)."""
        return self._complete

    def hand_over(self, reader: Reader) -> bool:
        """Let ``reader`` take this connection's reads until it calls ``take_back``: only between two chunks of
        the answer, with nothing buffered, on a plain TCP connection (False, and nothing changes, otherwise).
        The read timeout's silence runs from ``reader.last`` meanwhile."""
        transport = self.transport
        if (
            transport is None or not self._boundary or self._chunks or self._paused or self._complete
            or self._error is not None or self.origin.ssl is not None
        ):  # fmt: skip
            return False
        transport.set_protocol(cast(asyncio.BaseProtocol, reader))
        self._reader = reader
        return True

    def take_back(self, data: bytes | None) -> None:
        """The reads come here again, from ``data`` (what the other protocol read and did not take) on."""
        self._waiting_since = self._last_heard()
        self._reader = None
        if self.transport is not None:
            self.transport.set_protocol(self)
        if data is not None:
            self.data_received(data)

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    def _resume(self) -> None:
        if self._paused:
            self._paused = False  # also when the connection is gone, or pump() spins on drained(), blocking the loop
            if self.transport is not None:
                self.transport.resume_reading()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """The answer was read: keep the connection for the next request, or close it."""
        usable = self._complete and self._keep_alive and not self._chunks and self.transport is not None
        self._disarm()
        if usable and not self.origin.closed:
            self.origin.keep(self)
        else:
            self.close()

    def close(self) -> None:
        """Drop the connection at once: vLLM aborts the request whose connection goes away."""
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        """Until the engine sends, or closes, or lets writing resume; silent for the read timeout, it fails.

        One timer serves all the waits of an answer (a stream waits once per token): it fires, sees
        when the wait in progress began, and is set again for the rest of that wait."""
        waiter = self._waiter = self.loop.create_future()
        self._waiting_since = now = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(now + self.read_timeout, self._check_silence)
        try:
            await waiter
        finally:
            self._waiter = None

    def _last_heard(self) -> float:
        """When the engine last sent, on the loop's clock: the reader's last read while it has the reads (its
        perf_counter time moved to the loop's clock, uvloop's being libuv's in milliseconds)."""
        since, reader = self._waiting_since, self._reader
        if reader is None:
            return since
        return max(since, reader.last + self.loop.time() - time.perf_counter())

    def _check_silence(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # not waiting: the next wait arms the timer again
        deadline = self._last_heard() + self.read_timeout
        if self.loop.time() >= deadline:
            self._fail(EngineTimeout(f"the engine was silent for {self.read_timeout:g} s"))
        else:
            self._timer = self.loop.call_at(deadline, self._check_silence)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: EngineError) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()


class EngineClient:
    """Sends requests to engines over pooled keep-alive connections."""

    def __init__(self, connect_timeout: float, read_timeout: float, api_key: str = "") -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.authorization = f"Bearer {api_key}" if api_key else None  # the engines' key (vLLM's --api-key)
        self._origins: dict[str, Origin] = {}

    def origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url)
            if origin.authorization is None:
                origin.authorization = self.authorization
        return origin

    async def request(
        self,
        base_url: str,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | bytearray | memoryview,
    ) -> EngineConnection:
        """Send a request and wait for the answer's headers.  ``headers`` must hold no hop-by-hop ones,
        no Host and no Content-Length: they are this hop's and are written here."""
        origin = self.origin(base_url)
        lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        if origin.authorization is None:
            lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        else:
            lines.extend(f"{name}: {value}\r\n" for name, value in headers if name.lower() != "authorization")
            lines.append(f"Authorization: {origin.authorization}\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")  # the client's bytes, as aiohttp decoded them
        head_only = method == "HEAD"
        conn = origin.take()
        if conn is not None:
            if method not in IDEMPOTENT:
                return await self._exchange(conn, head, body, head_only)
            try:
                return await self._exchange(conn, head, body, head_only)
            except _Stale:
                pass  # most likely never read, and safe to repeat: once more, on a fresh connection
        return await self._exchange(await self._connect(origin), head, body, head_only)

    async def _exchange(
        self, conn: EngineConnection, head: bytes, body: bytes | bytearray | memoryview, head_only: bool
    ) -> EngineConnection:
        try:
            await conn.send(head, body, head_only=head_only)
            await conn.read_headers()
        except BaseException:
            conn.close()
            raise
        return conn

    async def _connect(self, origin: Origin) -> EngineConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: EngineConnection(origin, self.read_timeout),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except TimeoutError:
            raise EngineUnreachable(f"connecting timed out after {self.connect_timeout:g} s") from None
        except MemoryError:
            raise GatewayExhausted("out of memory") from None
        except OSError as exc:
            if exc.errno in LOCAL_EXHAUSTION:
                raise GatewayExhausted(exc.strerror or str(exc)) from None
            raise EngineUnreachable(f"cannot connect: {(exc.strerror or str(exc)).lower()}") from None
        return conn

    def abort(self, reason: str) -> None:
        """Fail every answer in progress with ``reason`` (the drain's deadline): each request's relay ends it."""
        for origin in self._origins.values():
            for conn in [c for c in origin.open if c not in origin.idle]:
                conn._fail(EngineAborted(reason))

    def close(self) -> None:
        for origin in self._origins.values():
            origin.close()
