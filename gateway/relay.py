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
from gateway.metrics.gateway import GatewayMetrics
from gateway.protocol import Generation

log = logging.getLogger("gateway.relay")

SSE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
_USAGE_CHUNK = b'"choices":[]'
_TERMINAL = b'"finish_reason":"'  # a choice's last chunk (finish_reason not null)
_ERROR_EVENT = b'data: {"error"'
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

    def __init__(self, metrics: GatewayMetrics, read_timeout: float) -> None:
        self.metrics = metrics
        self.read_timeout = read_timeout

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
        heartbeat (when on) keeps the client informed; after it, reads arm no timer."""
        beat = ex.heartbeat
        ex.status = resp.status
        if beat is not None and beat.response is not None:
            out = beat.response  # the gateway's 200 went out already; the engine's head stays here
        else:
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            await out.prepare(request)
            if beat is not None:
                beat.response = out
        itl = self.metrics.child(self.metrics.itl, ex.model, ex.endpoint)
        start = ex.start
        carry = b""
        last = 0.0
        events = 0
        written = 0
        strip = gen.strip_usage
        held = b""  # terminal events of a stream whose usage chunk the gateway takes out, until it arrives
        first = True
        read = resp.read_chunk
        waiting = beat  # until the first content event

        def prefill() -> str:
            return f"prefill elapsed={perf_counter() - sent:.0f}s"

        try:
            while chunk := await (read() if waiting is None else waiting.wait(read(), prefill)):
                if carry:
                    chunk = carry + chunk
                end = chunk.rfind(b"\n\n") + 2
                if end == 1:
                    carry = chunk  # no complete event yet
                    continue
                if end == len(chunk):
                    carry = b""
                else:
                    chunk, carry = chunk[:end], chunk[end:]
                n = chunk.count(b"\n\n") - comment_blocks(chunk)
                if not n and held:
                    held += chunk  # a comment does not overtake what is held back
                    continue
                if n:
                    now = perf_counter()
                    if first:
                        ex.first_byte_at = now  # the engine's queue and prefill end here
                        ex.phase = "decode"
                        first = False
                        waiting = None
                    if chunk.endswith(DONE):
                        n -= 1
                    if last == 0.0 and b'"role":' in chunk:
                        n -= chunk.count(b'"role":')  # the role-only first chunks (one per choice): no token
                    if _ERROR_EVENT in chunk:  # the engine's own failure after its 200: no token either
                        n -= chunk.count(_ERROR_EVENT)
                        ex.error_type = "upstream_error"
                    if _USAGE_CHUNK in chunk:
                        chunk = self._take_usage(held + chunk if held else chunk, strip, ex)
                        held = b""
                        n -= 1
                    elif strip and _TERMINAL in chunk:
                        held += chunk  # until the usage chunk: it carries 0.33's system_fingerprint
                        chunk = b""
                    elif held:
                        chunk, held = held + chunk, b""
                    if n > 0:
                        events += n
                        if last == 0.0:
                            ex.ttft = now - start
                        else:
                            itl.observe(now - last)
                        for _ in range(n - 1):
                            itl.observe(0.0)  # events that arrived together
                        last = now
                if chunk:
                    written += len(chunk)
                    await out.write(chunk)
                    if waiting is not None:
                        waiting.wrote()  # the engine's own keep-alive: no gateway comment on top of it
            if held or carry:
                written += len(held) + len(carry)
                await out.write(held + carry)
        except EngineError as exc:
            # The engine died mid-stream.  vLLM reports its own mid-stream failures as an error event
            # followed by [DONE]; do the same, so OpenAI clients raise instead of ending quietly.
            self._broken(request, ex, exc)
            broken = GatewayError(ex.error_type or "upstream_error", f"The engine broke off the stream: {exc}.")
            if held:
                await out.write(held)
            ex.bytes_out = written + len(held)
            await end_with_error(out, broken.body(), ex)
            return out
        if ex.completion_tokens is None:
            ex.completion_tokens = events
        ex.bytes_out = written
        await out.write_eof()
        return out

    def _take_usage(self, chunk: bytes, strip: bool, ex: Exchange) -> bytes:
        """Read the usage chunk's counts; take it out when the gateway asked for it.  vLLM 0.33 stamps its
        system_fingerprint on the terminal chunks when usage is off, on the usage chunk when it is on: a
        client that did not ask gets it where vLLM would have put it."""
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
        if not strip:
            return chunk
        before = chunk[:begin]
        fingerprint = event.get("system_fingerprint")
        if isinstance(fingerprint, str) and _TERMINAL in before:
            before = _stamp(before, b',"system_fingerprint":' + json.dumps(fingerprint).encode() + b"}")
        return before + chunk[end:]

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
