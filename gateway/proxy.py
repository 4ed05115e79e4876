"""The request path: receive, admit, forward, relay, record."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter

from aiohttp import web

from gateway.admission import Admission
from gateway.client import EngineClient, EngineConnection, EngineError, EngineTimeout, EngineUnreachable
from gateway.errors import REQUEST_ID, GatewayError
from gateway.metrics.gateway import UNKNOWN_MODEL, GatewayMetrics
from gateway.protocol import GENERATION_PATHS, Generation, context_error, is_glm4, parse_generation
from gateway.settings import Settings
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("gateway.proxy")

DEFAULT_CONTEXT_WINDOW = 1048576

# Request ids made here: a random prefix per process and a counter, unique without a syscall per request.
_ID_PREFIX = uuid.uuid4().hex[:16] + "-"
_ids = itertools.count(1)

# RFC 9110 §7.6.1, plus what each hop sets itself, and the request id the gateway sets
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect", REQUEST_ID.lower())
)  # fmt: skip
_IDENTITY = ("Accept-Encoding", "identity")  # the relay reads SSE events and usage counts: no compression
_HOP_BY_HOP_AND_ENCODING = _HOP_BY_HOP | {"accept-encoding"}
ENDPOINTS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/version": "version",
}
_INLINE_BODY_MAX = 1 << 20  # answers up to this size are read whole and written in one go
_SSE = "text/event-stream"
_DONE = b"data: [DONE]\n\n"
_USAGE_CHUNK = b'"choices":[]'
_USAGE = re.compile(rb'"prompt_tokens":\s*(\d+).*?"completion_tokens":\s*(\d+)', re.S)


def _filter_headers(
    headers: Mapping[str, str], request_id: str, *extra: tuple[str, str], drop: frozenset[str] = _HOP_BY_HOP
) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers (``drop``), those named in Connection too, and set the request id."""
    connection = headers.get("Connection")
    if connection:
        drop = drop | {name.strip().lower() for name in connection.split(",")}
    out = [(name, value) for name, value in headers.items() if name.lower() not in drop]
    out.append((REQUEST_ID, request_id))
    out.extend(extra)
    return out


def _too_large(limit: int) -> GatewayError:
    return GatewayError("body_too_large", f"Request body is larger than the gateway's limit of {limit} bytes.")


class _Exchange:
    """What one request measured on its way through, recorded once at the end."""

    __slots__ = (
        "completion_tokens", "endpoint", "error_type", "first_byte", "first_byte_at", "model", "prompt_tokens",
        "queue_wait", "relay", "start", "status", "ttft",
    )  # fmt: skip

    def __init__(self, start: float, endpoint: str) -> None:
        self.start = start
        self.endpoint = endpoint
        self.model = ""
        self.status = 0
        self.error_type: str | None = None
        self.queue_wait: float | None = None
        self.first_byte: float | None = None
        self.first_byte_at = 0.0
        self.relay: float | None = None
        self.ttft: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None


_Inner = Callable[[web.Request, str, _Exchange], Awaitable[web.StreamResponse]]


class Proxy:
    """Holds what the request path needs; ``handle`` is the aiohttp handler for proxied routes."""

    def __init__(self, settings: Settings, admission: Admission, pool: UpstreamPool, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.admission = admission
        self.pool = pool
        self.metrics = metrics
        self.client = EngineClient(settings.upstream_connect_timeout, settings.upstream_read_timeout)
        self.draining = False
        self.active = 0  # requests inside the handler, queued ones included: drain waits for 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.requests_total = 0
        self.requests_failed = 0

    # -- receive ------------------------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> bytearray:
        """Read the body, counting bytes ourselves: chunked bodies have no Content-Length to check."""
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        if not request.body_exists:
            return bytearray()
        buf = bytearray()
        content = request.content
        while chunk := await content.readany():
            buf += chunk
            if len(buf) > limit:
                raise _too_large(limit)
        return buf  # no copy: json.loads and the client both take a bytearray

    def _default_model(self) -> str:
        """vLLM serves its first model to requests that name none."""
        return next(iter(self.pool.models()), "")

    def _serves_glm4(self, model: str) -> bool:
        """Is the model a request names (or the default one, when it names none) a GLM-4 model?"""
        return is_glm4(model or self._default_model())

    def context_window(self, model: str = "") -> int:
        """--context-window, else the model's max_model_len, else the smallest served one."""
        if self.settings.context_window:
            return self.settings.context_window
        served = self.pool.models()
        if model in served:
            return served[model]
        return min(served.values()) if served else DEFAULT_CONTEXT_WINDOW

    def model_label(self, model: str) -> str:
        """Bounded label values: served models as they are, anything else folded into one value."""
        if model in self.pool.models():
            return model
        return (not model and self._default_model()) or UNKNOWN_MODEL

    # -- the handler ----------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The handler of proxied routes."""
        return await self._serve(request, self._handle)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """The handler of every other path: counted and answered like any gateway-made error."""
        return await self._serve(request, self._not_found)

    async def _not_found(self, request: web.Request, request_id: str, ex: _Exchange) -> web.StreamResponse:
        raise GatewayError("not_found", f"Not found: {request.method} {request.path}")

    async def _serve(self, request: web.Request, inner: _Inner) -> web.StreamResponse:
        ex = _Exchange(perf_counter(), ENDPOINTS.get(request.path, "other"))
        request_id = request.headers.get(REQUEST_ID) or f"{_ID_PREFIX}{next(_ids):x}"
        self.active += 1
        self.idle.clear()
        try:
            return await inner(request, request_id, ex)
        except GatewayError as exc:
            ex.status, ex.error_type = exc.status, exc.error_type
            if exc.status >= 500:
                log.warning("request %s: %s %s", request_id, exc.error_type, exc.message)
            return exc.response(request_id)
        except (asyncio.CancelledError, ConnectionResetError):
            ex.status, ex.error_type = 499, "client_disconnected"
            raise
        except Exception:
            log.exception("request %s failed inside the gateway", request_id)
            error = GatewayError("internal_error", "The gateway failed to handle the request.")
            ex.status, ex.error_type = error.status, error.error_type
            return error.response(request_id)
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()
            self._record(ex)

    async def _handle(self, request: web.Request, request_id: str, ex: _Exchange) -> web.StreamResponse:
        if self.draining:
            raise GatewayError("draining", "The gateway is shutting down. Retry on another instance.", retry_after=1)
        body = await self._read_body(request)
        gen: Generation | None = None
        admitted = request.method == "POST" and request.path.startswith("/v1/")
        cost = 0
        if admitted and request.path in GENERATION_PATHS:
            glm_stops = self._serves_glm4 if self.settings.glm_stop_tokens else None
            if len(body) > _INLINE_BODY_MAX:  # tens of ms on a 6 MB prompt: keep the loop relaying streams
                gen = await asyncio.to_thread(parse_generation, request.path, body, glm_stops=glm_stops)
            else:
                gen = parse_generation(request.path, body, glm_stops=glm_stops)
            ex.model = self.model_label(gen.model)
            error = context_error(self.context_window(gen.model), gen.prompt_tokens, gen.max_tokens)
            if error is not None:
                raise error
            ex.prompt_tokens = gen.prompt_tokens
            cost = gen.prompt_tokens + (gen.max_tokens or 0)
            body = gen.body
        if not admitted:
            return await self._forward(request, request_id, body, gen, ex)
        ex.queue_wait = await self.admission.acquire(cost)
        try:
            return await self._forward(request, request_id, body, gen, ex)
        finally:
            self.admission.release(cost)

    # -- forward --------------------------------------------------------------------------------------

    async def _connect(
        self, request: web.Request, request_id: str, body: bytes | bytearray
    ) -> tuple[Upstream, EngineConnection]:
        """Send the request to the best engine; an engine that refuses the connection is skipped."""
        if request.path in GENERATION_PATHS:
            headers = _filter_headers(request.headers, request_id, _IDENTITY, drop=_HOP_BY_HOP_AND_ENCODING)
        else:
            headers = _filter_headers(request.headers, request_id)
        target = request.raw_path
        if not target.startswith("/"):  # absolute-form: the engine gets the path alone
            target = request.rel_url.raw_path_qs
        reason = "no upstream configured"
        for upstream in self.pool.candidates():
            upstream.in_flight += 1
            try:
                resp = await self.client.request(upstream.url, request.method, target, headers, body)
            except EngineUnreachable as exc:
                upstream.in_flight -= 1
                reason = f"{upstream.url}: {exc}"
                self.pool.mark_down(upstream, reason)
                continue  # nothing was sent: safe to try the next engine
            except EngineError as exc:
                upstream.in_flight -= 1
                raise self._engine_error(exc) from None
            except BaseException:
                upstream.in_flight -= 1
                raise
            return upstream, resp
        raise GatewayError("upstream_unavailable", f"No engine could be reached ({reason}).")

    async def _forward(
        self, request: web.Request, request_id: str, body: bytes | bytearray, gen: Generation | None, ex: _Exchange
    ) -> web.StreamResponse:
        sent = perf_counter()
        upstream, resp = await self._connect(request, request_id, body)
        ex.first_byte_at = perf_counter()  # a stream moves it to its first event: vLLM sends headers at once
        try:
            headers = _filter_headers(resp.headers, request_id)
            if resp.content_type == _SSE and gen is not None:
                out = await self._relay_events(request, resp, headers, gen, ex)
            elif resp.content_length is not None and resp.content_length <= _INLINE_BODY_MAX:
                out = await self._relay_whole(request, resp, headers, gen, ex)
            else:
                out = await self._relay_bytes(request, resp, headers, ex)
        except BaseException:
            resp.close()  # closes the engine connection: vLLM aborts the request at once
            raise
        finally:
            upstream.in_flight -= 1
            ex.first_byte = ex.first_byte_at - sent
            ex.relay = perf_counter() - ex.first_byte_at
        resp.release()
        if ex.status >= 500 and ex.error_type is None:
            ex.error_type = "upstream_error"  # the engine's own failure, passed through as it was
        return out

    def _engine_error(self, exc: EngineError) -> GatewayError:
        """The engine failed before the client got a byte: a timeout is a 504, anything else a 502."""
        if isinstance(exc, EngineTimeout):
            return GatewayError(
                "upstream_timeout", f"The engine was silent for {self.settings.upstream_read_timeout:g} s."
            )
        return GatewayError("upstream_error", f"The engine failed the request: {exc!r}")

    # -- relay ----------------------------------------------------------------------------------------

    async def _relay_whole(
        self,
        request: web.Request,
        resp: EngineConnection,
        headers: list[tuple[str, str]],
        gen: Generation | None,
        ex: _Exchange,
    ) -> web.Response:
        try:
            data = await resp.read()
        except EngineError as exc:
            raise self._engine_error(exc) from None
        ex.ttft = perf_counter() - ex.start
        ex.status = resp.status
        if gen is not None and resp.status == 200:
            self._usage(data, ex)
        out = web.Response(status=resp.status, reason=resp.reason, body=data, headers=headers)
        await out.prepare(request)  # written here, so the duration and a client leaving are recorded
        await out.write_eof()
        return out

    async def _relay_bytes(
        self, request: web.Request, resp: EngineConnection, headers: list[tuple[str, str]], ex: _Exchange
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        ex.status = resp.status
        await out.prepare(request)
        try:
            while chunk := await resp.read_chunk():
                if ex.ttft is None:
                    ex.ttft = perf_counter() - ex.start
                await out.write(chunk)
        except EngineError as exc:
            self._broken(request, ex, exc)
            return out
        await out.write_eof()
        return out

    async def _relay_events(
        self,
        request: web.Request,
        resp: EngineConnection,
        headers: list[tuple[str, str]],
        gen: Generation,
        ex: _Exchange,
    ) -> web.StreamResponse:
        """Relay SSE as it arrives, whole events at a time; time content events; take out the usage
        chunk the gateway asked for on the client's behalf."""
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        ex.status = resp.status
        await out.prepare(request)
        itl = self.metrics.child(self.metrics.itl, ex.model, ex.endpoint)
        start = ex.start
        carry = b""
        last = 0.0
        events = 0
        strip = gen.strip_usage
        first = True
        try:
            while chunk := await resp.read_chunk():
                if first:
                    ex.first_byte_at = perf_counter()  # the engine's queue and prefill end here
                    first = False
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
                now = perf_counter()
                n = chunk.count(b"\n\n")
                if chunk.endswith(_DONE):
                    n -= 1
                if _USAGE_CHUNK in chunk:
                    chunk = self._take_usage(chunk, strip, ex)
                    n -= 1
                if last == 0.0 and b'"role"' in chunk:
                    n -= 1  # the role-only first chunk of a chat stream carries no token
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
                    await out.write(chunk)
            if carry:
                await out.write(carry)
        except EngineError as exc:
            # The engine died mid-stream.  vLLM reports its own mid-stream failures as an error event
            # followed by [DONE]; do the same, so OpenAI clients raise instead of ending quietly.
            self._broken(request, ex, exc, close=False)
            error = GatewayError(ex.error_type or "upstream_error", f"The engine broke off the stream: {exc!r}")
            await out.write(b"data: " + error.body() + b"\n\n" + _DONE)
        else:
            if ex.completion_tokens is None:
                ex.completion_tokens = events
        await out.write_eof()
        return out

    def _take_usage(self, chunk: bytes, strip: bool, ex: _Exchange) -> bytes:
        at = chunk.find(_USAGE_CHUNK)
        begin = chunk.rfind(b"data:", 0, at)
        end = chunk.find(b"\n\n", at) + 2
        try:
            usage = json.loads(chunk[begin + 5 : end])["usage"]
            ex.prompt_tokens = int(usage["prompt_tokens"])
            ex.completion_tokens = int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            return chunk
        return chunk[:begin] + chunk[end:] if strip else chunk

    def _usage(self, data: bytes, ex: _Exchange) -> None:
        at = data.rfind(b'"usage"')
        if at >= 0 and (found := _USAGE.search(data, at)):
            ex.prompt_tokens = int(found[1])
            ex.completion_tokens = int(found[2])

    def _broken(self, request: web.Request, ex: _Exchange, exc: BaseException, *, close: bool = True) -> None:
        ex.error_type = "upstream_timeout" if isinstance(exc, EngineTimeout) else "upstream_error"
        log.warning("%s %s: engine broke off the response: %r", request.method, request.path, exc)
        if close and request.transport is not None:
            request.transport.close()  # the client must see a truncated answer, not a complete one

    # -- record ---------------------------------------------------------------------------------------

    def _record(self, ex: _Exchange) -> None:
        m, model, endpoint = self.metrics, ex.model, ex.endpoint
        child = m.child
        self.requests_total += 1
        status = str(ex.status)
        child(m.requests, model, endpoint, status).inc()
        child(m.duration, model, endpoint, status).observe(perf_counter() - ex.start)
        if ex.error_type is not None:
            self.requests_failed += 1
            child(m.errors, model, endpoint, ex.error_type).inc()
        # prompt tokens only for answered requests, whose count the engine's usage gives
        prompt_tokens = ex.prompt_tokens if ex.completion_tokens is not None else None
        for histogram, observed in (
            (m.queue_wait, ex.queue_wait),
            (m.first_byte, ex.first_byte),
            (m.relay, ex.relay),
            (m.ttft, ex.ttft),
            (m.completion_tokens, ex.completion_tokens),
            (m.prompt_tokens, prompt_tokens),
        ):
            if observed is not None:
                child(histogram, model, endpoint).observe(observed)
