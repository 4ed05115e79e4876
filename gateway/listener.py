"""The server side of client connections: head, body and idle timeouts, a connection cap, HTTP versions, fds.

aiohttp's server waits an hour for a request head and has no limit on connections (slowloris); these
limits live in a subclass of its connection protocol, made by a subclass of its ``Server``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from multidict import CIMultiDict

from gateway.errors import GatewayError
from gateway.metrics.gateway import GatewayMetrics
from gateway.settings import Settings

log = logging.getLogger("gateway.listener")

_FDS_RESERVED = 64  # files, logs, the health checks' and scrapes' connections
_REFUSAL_LINGER = 2.0  # seconds a refused connection stays open for the client to read its 503


class ListenError(Exception):
    """The listening socket could not be opened (the port is taken, the address is not this host's)."""

    @classmethod
    def of(cls, host: str, port: int, exc: OSError) -> ListenError:
        """The error in one line, as the OS says it (without asyncio's and socket's additions to a taken port)."""
        what = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
        return cls(f"cannot listen on {host}:{port}: {what}")


@dataclass(frozen=True)
class ClientLimits:
    """What one client connection may take: seconds for its head, between body bytes, idle, not reading what
    it was sent; connections."""

    header_timeout: float = 15.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    max_connections: int = 10000
    max_body_bytes: int = 16 * 1024 * 1024
    send_timeout: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientLimits:
        return cls(
            settings.client_header_timeout, settings.client_body_timeout, settings.keepalive_timeout,
            settings.max_connections, settings.max_body_bytes, settings.client_send_timeout,
        )  # fmt: skip


def _answer(status: int, reason: str, error: GatewayError, extra: str = "") -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, written below aiohttp's response objects."""
    body = error.body()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class ClientConnection(RequestHandler):
    """One client connection: its head must arrive within ``header_timeout`` (from the connection, then from
    the first byte of each next request), its body must progress every ``body_timeout``, and what it is sent
    must not stay unread for ``send_timeout`` (the socket's buffer full all that time)."""

    __slots__ = ("_body_timer", "_head_timer", "_last_progress", "_limits", "_listener", "_send_timer", "on_stall")

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener, keepalive_timeout=listener.limits.keepalive_timeout, **kwargs)
        self._listener = listener
        self._limits = listener.limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._last_progress = 0.0
        self.on_stall: Callable[[], None] | None = None  # told when the client cannot take more (the C splice)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener.open += 1
        self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._listener.open -= 1
        self._cancel_timers()
        if self.on_stall is not None:
            self.on_stall()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._send_timer = None

    def pause_writing(self) -> None:
        """The client reads slower than it is sent to (its socket's buffer is full): it has ``send_timeout``
        to take something off it, as nginx's ``send_timeout``."""
        super().pause_writing()
        self._send_timer = self._loop.call_later(self._limits.send_timeout, self._send_late)
        if self.on_stall is not None:
            self.on_stall()

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _send_late(self) -> None:
        """Nothing read for ``send_timeout`` s: the connection is dropped, so the request ends as one whose client
        left (its engine request aborted, its slot freed), instead of holding them for a client that never reads."""
        self._send_timer = None
        if self.transport is not None:
            self._listener.closed("send_timeout")
            log.info("closed a connection whose client read nothing for %g s", self._limits.send_timeout)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._current_request is None and not self._messages and self._head_timer is None and data:
            self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_late)  # a next head
        queued = len(self._messages)
        super().data_received(data)
        self._last_progress = self._loop.time()
        if len(self._messages) > queued and self._head_timer is not None:
            self._head_timer.cancel()  # a whole head arrived
            self._head_timer = None
            if not self._messages[-1][1].is_eof() and self._body_timer is None:
                self._body_timer = self._loop.call_later(self._limits.body_timeout, self._body_check)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport is None or self._messages or self._current_request is not None:
            return
        timeout = self._limits.header_timeout
        error = GatewayError("client_timeout", f"The request head did not arrive within {timeout:g} s.")
        self._listener.closed("header_timeout")
        self.transport.write(_answer(408, "Request Timeout", error))
        self.force_close()

    def _body_check(self) -> None:
        """No body byte for ``body_timeout`` s: the handler's read fails with a 408 and the connection closes."""
        self._body_timer = None
        request = self._current_request
        if self.transport is None or (request is None and not self._messages):
            return
        if request is not None and request.content.is_eof():
            return
        idle = self._loop.time() - self._last_progress
        timeout = self._limits.body_timeout
        # not yet handled (pipelined), or the gateway paused reading (not the client's fault): look again later
        if idle < timeout or self._reading_paused or request is None:
            self._body_timer = self._loop.call_later(max(timeout - idle, 0.01), self._body_check)
            return
        self._listener.closed("body_timeout")
        self.cut_body(GatewayError("client_timeout", f"The request body made no progress for {timeout:g} s."))

    def cut_body(self, error: GatewayError) -> bool:
        """End a body still arriving: the handler's next read raises ``error``, the connection closes after
        its answer.  False when no body is arriving."""
        request = self._current_request
        if request is None or request.content.is_eof():
            return False
        request.content.set_exception(error)
        request.content.feed_eof()  # aiohttp reads no more of it after the answer
        self.close()
        return True

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        refusal = self._refusal(request)
        if refusal is not None:  # answered as HTTP/1.1 whatever the request line said
            self._listener.closed("bad_version")
            if self.transport is not None:
                self.transport.write(refusal)
            self.force_close()
            return web.Response(status=400), True
        if (
            request.headers.get("Expect", "").lower() == "100-continue"
            and (request.content_length or 0) > self._limits.max_body_bytes
        ):
            # no 100 Continue for a body that will be refused: the handler answers 413 from the header alone
            request = request.clone(
                headers=CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() != "expect")
            )
        return await super()._handle_request(request, start_time, request_handler)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """A request aiohttp's parser refused (malformed, smuggling): one log line and a JSON 400, not a
        traceback in the log per request, which a client could send at will.  A client that left while its
        answer was written: nothing to log (its access log line says 499) and nobody to answer."""
        if isinstance(exc, ConnectionResetError):
            self.force_close()
            return web.Response(status=499)
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self._listener.closed("malformed")
        reason = next(iter(str(exc.message).splitlines()), "")
        log.info("refused a malformed request from %s: %s", request.remote, reason)
        error = GatewayError("invalid_request", "The request is not valid HTTP/1.1.")
        response = web.Response(status=status, body=error.body(), content_type="application/json")
        response.force_close()
        return response

    @staticmethod
    def _refusal(request: BaseRequest) -> bytes | None:
        """HTTP/2.0 (and any major version above 1) is 505, a version-less HTTP/0.9 line 400, as nginx does."""
        if request.version in (HttpVersion11, HttpVersion10):
            return None
        if request.version.major >= 2:
            error = GatewayError("invalid_request", f"HTTP/{request.version.major}.{request.version.minor} is "
                                 "not spoken on this port: send HTTP/1.1.")  # fmt: skip
            return _answer(505, "HTTP Version Not Supported", error)
        return _answer(400, "Bad Request", GatewayError("invalid_request", "The request line has no HTTP version."))


class _Refused(asyncio.Protocol):
    """A connection over ``--max-connections``: a 503 at once, then closed when the client closes or soon."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.answer)  # type: ignore[union-attr]
        # the request is read and dropped until then: closing with it unread would reset the 503 away
        asyncio.get_running_loop().call_later(_REFUSAL_LINGER, self.transport.close)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes


class Listener(Server):
    """aiohttp's server, making ``ClientConnection`` protocols up to ``max_connections`` at once."""

    def __init__(self, limits: ClientLimits, on_close: Callable[[str], None] | None, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.open = 0
        self.on_close = on_close
        error = GatewayError(
            "too_many_connections", f"The gateway holds its limit of {limits.max_connections} connections.",
        )  # fmt: skip
        self._refusal = _answer(503, "Service Unavailable", error, "Retry-After: 1\r\n")

    def __call__(self) -> RequestHandler:  # type: ignore[override]
        if self.open >= self.limits.max_connections:
            self.closed("max_connections")
            return _Refused(self._refusal)  # type: ignore[return-value]
        return ClientConnection(self, loop=self._loop, **self._kwargs)

    def closed(self, reason: str) -> None:
        if self.on_close is not None:
            self.on_close(reason)

    def cut_bodies(self, error: GatewayError) -> int:
        """Drain: requests still receiving their body are answered ``error`` at once (they were not admitted)."""
        return sum(conn.cut_body(error) for conn in self.connections if isinstance(conn, ClientConnection))


class ListenerRunner(web.AppRunner):
    """An ``AppRunner`` whose server is a ``Listener``, its connections counted in the gateway's metrics."""

    def __init__(
        self, app: web.Application, limits: ClientLimits, metrics: GatewayMetrics | None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.metrics = metrics

    async def _make_server(self) -> Server:
        plain = await super()._make_server()  # the app's start-up, and the handler arguments
        metrics = self.metrics
        on_close = None if metrics is None else lambda reason: metrics.client_connections_closed.labels(reason).inc()
        listener = Listener(
            self.limits, on_close, plain.request_handler, request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs,
        )  # fmt: skip
        if metrics is not None:
            metrics.client_connections.set_function(lambda: listener.open)
        return listener

    @property
    def listener(self) -> Listener:
        assert isinstance(self.server, Listener), "the runner has not been set up"
        return self.server


def make_runner(
    app: web.Application,
    settings: Settings | None = None,
    metrics: GatewayMetrics | None = None,
    shutdown_timeout: float = 1.0,
) -> ListenerRunner:
    """The client limits of ``settings`` (defaults without).  handler_cancellation: a client that leaves
    cancels its handler at once, which closes the engine connection, which is how vLLM learns to abort
    (also during a silent prefill)."""
    limits = ClientLimits() if settings is None else ClientLimits.from_settings(settings)
    return ListenerRunner(
        app, limits, metrics, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )


def raise_open_files(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and say what it is; warn when a client connection
    and its engine connection each, at ``max_connections``, would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    need = 2 * max_connections + _FDS_RESERVED
    log.info("open files limit %d (hard %d); --max-connections %d needs up to %d", soft, hard, max_connections, need)
    if soft < need:
        log.warning(
            "the open-files limit %d is below what --max-connections %d may need (%d): lower --max-connections "
            "to %d or raise the limit (ulimit -n, LimitNOFILE=)", soft, max_connections, need,
            max((soft - _FDS_RESERVED) // 2, 1),
        )  # fmt: skip
    return soft


async def listen(runner: web.AppRunner, host: str, port: int) -> web.TCPSite:
    """Open the listening socket, or raise ``ListenError`` saying why in one line."""
    site = web.TCPSite(runner, host, port, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError.of(host, port, exc) from None
    return site
