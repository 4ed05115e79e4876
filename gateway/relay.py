"""Relaying an engine's answer to the client: whole, as bytes, or SSE event by event (comments, usage chunk)."""

from __future__ import annotations

import json
import logging
import re
from time import perf_counter

from aiohttp import web

from gateway.client import EngineAborted, EngineConnection, EngineError, EngineTimeout
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.listener import ClientConnection
from gateway.metrics.gateway import GatewayMetrics
from gateway.metrics.histogram import HistogramChild
from gateway.protocol import Generation

try:
    from gateway._splice import Splice
except ImportError:  # installed without a C compiler (pyproject.toml): every read takes the Python path
    Splice = None

log = logging.getLogger("gateway.relay")

SSE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
_USAGE_CHUNK = b'"choices":[]'
_TERMINAL = b'"finish_reason":"'  # a choice's last chunk (finish_reason not null)
_ERROR_EVENT = b'data: {"error"'
_NOT_FINISHED = b'"finish_reason":null'  # once in each token chunk (vLLM sends one choice per chunk)
_CARRY_MAX = 1 << 22  # bytes of one unfinished event held back at most (vLLM's, logprobs and all, are far less)
_BUSY = re.compile(rb"currently busy|backlog limit")  # vLLM 0.33's 503s when its own queue is full
_USAGE = re.compile(rb'"prompt_tokens":\s*(\d+).*?"completion_tokens":\s*(\d+)', re.S)


def engine_error(exc: EngineError, read_timeout: float) -> GatewayError:
    """The engine failed before the client got a byte: a timeout is a 504, the drain's cut a 503, anything
    else a 502."""
    if isinstance(exc, EngineAborted):
        return GatewayError("draining", f"The request was cut off: {exc}. Retry on another instance.", retry_after=1)
    if isinstance(exc, EngineTimeout):
        return GatewayError("upstream_timeout", f"The engine was silent for {read_timeout:g} s.")
    return GatewayError("upstream_error", f"The engine failed the request: {exc}.")


async def end_with_error(out: web.StreamResponse, error_json: bytes, ex: Exchange) -> None:
    """End a stream whose 200 has gone out with an error event and [DONE]: never a silent cut."""
    tail = b"data: " + error_json.strip() + b"\n\n" + DONE
    ex.bytes_out += len(tail)
    await out.write(tail)
    await out.write_eof()


def _stamp(events: bytes, field: bytes) -> bytes:
    """Add ``field`` (``,"name":value}``) at the end of each terminal event's JSON that lacks it."""
    out = []
    for event in events.split(b"\n\n"):
        if _TERMINAL in event and b'"system_fingerprint"' not in event and event.endswith(b"}"):
            event = event[:-1] + field
        out.append(event)
    return b"\n\n".join(out)


def comment_blocks(chunk: bytes) -> int:
    """SSE comment blocks (``: keep-alive``) in whole events: they carry no token and are relayed as they are."""
    if chunk[:1] != b":" and b"\n\n:" not in chunk:
        return 0
    return chunk.count(b"\n\n:") + (chunk[:1] == b":")


class Relay:
    """Writes one engine answer to the client, measuring what the client sees into the exchange."""

    def __init__(self, metrics: GatewayMetrics, read_timeout: float, splice: str = "auto") -> None:
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.native = Splice is not None and splice != "python"  # --relay-splice
        self.events_in_c = 0  # token events the C splice relayed: /status says whether it is at work

    def stats(self) -> dict[str, str | int]:
        return {"splice": "c" if self.native else "python", "events_in_c": self.events_in_c}

    async def whole(
        self,
        request: web.Request,
        resp: EngineConnection,
        headers: list[tuple[str, str]],
        gen: Generation | None,
        ex: Exchange,
    ) -> web.Response:
        try:
            data = await resp.read()
        except EngineError as exc:
            raise engine_error(exc, self.read_timeout) from None
        ex.ttft = perf_counter() - ex.start
        ex.status = resp.status
        if resp.status == 503 and _BUSY.search(data):
            ex.error_type = "engine_busy"  # a capacity signal, not a fault of the engine
        if gen is not None and resp.status == 200:
            at = data.rfind(b'"usage"')
            if at >= 0 and (found := _USAGE.search(data, at)):
                ex.prompt_tokens = int(found[1])
                ex.completion_tokens = int(found[2])
        out = web.Response(status=resp.status, reason=resp.reason, body=data, headers=headers)
        ex.bytes_out = len(data)
        await out.prepare(request)  # written here, so the duration and a client leaving are recorded
        await out.write_eof()
        return out

    async def raw(
        self, request: web.Request, resp: EngineConnection, headers: list[tuple[str, str]], ex: Exchange
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        ex.status = resp.status
        await out.prepare(request)
        try:
            while chunk := await resp.read_chunk():
                if ex.ttft is None:
                    ex.ttft = perf_counter() - ex.start
                ex.bytes_out += len(chunk)
                await out.write(chunk)
        except EngineError as exc:
            self._broken(request, ex, exc)
            if request.transport is not None:
                request.transport.close()  # the client must see a truncated answer, not a complete one
            return out
        await out.write_eof()
        return out

    async def late_failure(self, out: web.StreamResponse, resp: EngineConnection, ex: Exchange) -> web.StreamResponse:
        """The engine refused a stream whose 200 a heartbeat already sent: its error becomes the error event."""
        try:
            data = await resp.read()
        except EngineError as exc:
            data = engine_error(exc, self.read_timeout).body()
        ex.status = resp.status
        if ex.error_type is None and resp.status >= 500:
            ex.error_type = "upstream_error"
        if not data.lstrip().startswith(b'{"error"'):
            message = f"The engine answered {resp.status} {resp.reason}."
            data = GatewayError(ex.error_type or "upstream_error", message).body()
        await end_with_error(out, data, ex)
        return out

    async def events(
        self,
        request: web.Request,
        resp: EngineConnection,
        headers: list[tuple[str, str]],
        gen: Generation,
        ex: Exchange,
        sent: float,
    ) -> web.StreamResponse:
        """Relay SSE as it arrives, whole events at a time; time content events (not comments); take out
        the usage chunk the gateway asked for on the client's behalf.  Until the first content event a
        heartbeat (when on) keeps the client informed and each read is awaited; after it, the engine's
        bytes are written to the client from the connection's own callback (``_splice``)."""
        beat = ex.heartbeat
        ex.status = resp.status
        if beat is not None and beat.response is not None:
            out = beat.response  # the gateway's 200 went out already; the engine's head stays here
        else:
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            await out.prepare(request)
            if beat is not None:
                beat.response = out
        stream = _Events(self.metrics.child(self.metrics.itl, ex.model, ex.endpoint), gen.strip_usage, ex)
        chunked = out.headers.get("Transfer-Encoding") == "chunked"  # else HTTP/1.0: awaited writes throughout
        read = resp.read_chunk

        def prefill() -> str:
            return f"prefill elapsed={perf_counter() - sent:.0f}s"

        try:
            while chunk := await (read() if beat is None else beat.wait(read(), prefill)):
                data = stream.feed(chunk)
                if data:
                    stream.written += len(data)
                    await out.write(data)
                    if beat is not None:
                        beat.wrote()  # the engine's own keep-alive: no gateway comment on top of it
                if stream.last:  # tokens flow: no more heartbeats, and the rest from the connection's callback
                    if beat is not None:
                        beat.stop()
                        beat = None
                    if chunked:
                        await self._splice(request, resp, stream)
                        break
            rest = stream.rest()  # written with the chunked body's end: one write
            stream.written += len(rest)
        except EngineError as exc:
            # The engine died mid-stream.  vLLM reports its own mid-stream failures as an error event
            # followed by [DONE]; do the same, so OpenAI clients raise instead of ending quietly.
            self._broken(request, ex, exc)
            broken = GatewayError(ex.error_type or "upstream_error", f"The engine broke off the stream: {exc}.")
            held, stream.held = stream.held, b""
            if held:
                await out.write(held)
            ex.bytes_out = stream.written + len(held)
            await end_with_error(out, broken.body(), ex)
            return out
        if ex.completion_tokens is None:
            ex.completion_tokens = stream.events
        ex.bytes_out = stream.written
        await out.write_eof(rest)
        return out

    async def _splice(self, request: web.Request, resp: EngineConnection, stream: _Events) -> None:
        """The rest of a stream, relayed from the engine connection's callback straight to the client's transport
        in chunked encoding: no task wake-up and no awaited write per event.  The coroutine waits only for the end,
        for a client that reads slower than the engine writes (reading from the engine pauses meanwhile), or for
        a client that left.  With the C splice, reads of whole token chunks do not even reach Python: the
        connection is handed to it between two chunks, and it hands every other read back (gateway/_splice.c)."""
        transport = request.transport
        protocol = request.protocol
        assert transport is not None
        # the C splice asks nothing of the client's transport per read: the client's connection tells it to stop
        native = self.native and isinstance(protocol, ClientConnection)

        def back(data: bytes | None) -> None:
            """The C splice hands the connection back: what it relayed is counted, ``data`` read here."""
            stream.events += fast.events
            self.events_in_c += fast.events
            stream.written += fast.written
            stream.last = fast.last
            resp.take_back(data)

        fast = Splice(transport, resp, back, stream.itl) if native else None

        def sink(data: bytes) -> bool:
            data = stream.feed(data)
            if data:
                if transport.is_closing():
                    return False  # the client left: the coroutine says so, the connection to the engine closes
                if resp.complete:  # the answer's last read: it goes out with the chunked body's end
                    stream.tail = data
                    return True
                stream.written += len(data)
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
                if protocol.writing_paused:
                    return False
            if fast is not None:
                enter()
            return True

        def enter() -> None:
            if not (
                stream.carry or stream.held or protocol.writing_paused or transport.is_closing()
            ) and resp.hand_over(fast):
                fast.arm(stream.last)

        async def drained() -> None:
            if transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            await request.writer.drain()

        if fast is not None:
            protocol.on_stall = fast.stall
            enter()
        try:
            await resp.pump(sink, drained)
        finally:
            if fast is not None:
                protocol.on_stall = None
                fast.close()  # taking the connection back if the client left, or the request was cancelled

    def _broken(self, request: web.Request, ex: Exchange, exc: BaseException) -> None:
        if isinstance(exc, EngineAborted):
            ex.error_type = "draining"  # the gateway's own cut, not the engine's failure
            return
        ex.error_type = "upstream_timeout" if isinstance(exc, EngineTimeout) else "upstream_error"
        log.warning(
            "request %s: %s %s: the engine %s broke off the response: %s",
            ex.request_id, request.method, request.path, ex.upstream, exc,
            extra={"request_id": ex.request_id, "upstream": ex.upstream},
        )  # fmt: skip


class _Events:
    """One SSE answer on its way through: whole events out (the rest carried to the next read), content
    events counted and timed (comments, role chunks and error events are not tokens), the usage chunk read
    and taken out when the gateway asked for it, terminal chunks held until it comes."""

    __slots__ = ("carry", "events", "ex", "held", "itl", "last", "strip", "tail", "written")

    def __init__(self, itl: HistogramChild, strip: bool, ex: Exchange) -> None:
        self.itl = itl
        self.strip = strip
        self.ex = ex
        self.carry = b""  # an event not complete yet
        self.held = b""  # terminal events of a stream whose usage chunk the gateway takes out, until it arrives
        self.tail = b""  # the last events, relayed with the end of the body
        self.last = 0.0  # when the last content event arrived; 0 before the first
        self.events = 0
        self.written = 0

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (bytes read from the engine) goes to the client now."""
        if self.carry:
            chunk = self.carry + chunk
        end = chunk.rfind(b"\n\n") + 2
        if end == 1:
            if len(chunk) > _CARRY_MAX:  # an engine that never ends its event: relayed as it is, not held
                self.carry = b""
                return chunk
            self.carry = chunk  # no complete event yet
            return b""
        if end == len(chunk):
            self.carry = b""
        else:
            chunk, self.carry = chunk[:end], chunk[end:]
        last = self.last
        n = chunk.count(b"\n\n")
        if last and not self.held and chunk.count(_NOT_FINISHED) == n:
            # the common case mid-stream, token chunks only: every event finishes nothing, so none is a comment,
            # an error, the usage chunk, a terminal chunk or [DONE] (inside a JSON string the marker is escaped)
            now = perf_counter()
            self.events += n
            itl = self.itl
            itl.observe(now - last)
            for _ in range(n - 1):
                itl.observe(0.0)  # events that arrived together
            self.last = now
            return chunk
        n -= comment_blocks(chunk)
        held = self.held
        if not n:
            if held:
                self.held = held + chunk  # a comment does not overtake what is held back
                return b""
            return chunk
        now = perf_counter()
        ex = self.ex
        if ex.phase != "decode":
            ex.first_byte_at = now  # the engine's queue and prefill end here
            ex.phase = "decode"
        if chunk.endswith(DONE):
            n -= 1
        if last == 0.0 and b'"role":' in chunk:
            n -= chunk.count(b'"role":')  # the role-only first chunks (one per choice): no token
        if _ERROR_EVENT in chunk:  # the engine's own failure after its 200: no token either
            n -= chunk.count(_ERROR_EVENT)
            ex.error_type = "upstream_error"
        if _USAGE_CHUNK in chunk:
            chunk = self._take_usage(held + chunk if held else chunk)
            self.held = b""
            n -= 1
        elif self.strip and _TERMINAL in chunk:
            self.held = held + chunk  # until the usage chunk: it carries 0.33's system_fingerprint
            chunk = b""
        elif held:
            chunk, self.held = held + chunk, b""
        if n > 0:
            self.events += n
            if last == 0.0:
                ex.ttft = now - ex.start
            else:
                self.itl.observe(now - last)
            for _ in range(n - 1):
                self.itl.observe(0.0)  # events that arrived together
            self.last = now
        return chunk

    def rest(self) -> bytes:
        """At the end of the answer: the last events, and what was held back or never completed, as it is."""
        rest = self.tail + self.held + self.carry
        self.tail = self.held = self.carry = b""
        return rest

    def _take_usage(self, chunk: bytes) -> bytes:
        """Read the usage chunk's counts; take it out when the gateway asked for it.  vLLM 0.33 stamps its
        system_fingerprint on the terminal chunks when usage is off, on the usage chunk when it is on: a
        client that did not ask gets it where vLLM would have put it."""
        ex = self.ex
        at = chunk.find(_USAGE_CHUNK)
        begin = chunk.rfind(b"data:", 0, at)
        end = chunk.find(b"\n\n", at) + 2
        try:
            event = json.loads(chunk[begin + 5 : end])
            usage = event["usage"]
            ex.prompt_tokens = int(usage["prompt_tokens"])
            ex.completion_tokens = int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            return chunk
        if not self.strip:
            return chunk
        before = chunk[:begin]
        fingerprint = event.get("system_fingerprint")
        if isinstance(fingerprint, str) and _TERMINAL in before:
            before = _stamp(before, b',"system_fingerprint":' + json.dumps(fingerprint).encode() + b"}")
        return before + chunk[end:]
