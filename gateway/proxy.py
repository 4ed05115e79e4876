"""The request path, as a conductor of its stages: receive, authenticate, admit, route, forward, relay, record."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from time import perf_counter

from aiohttp import web

from gateway import relay
from gateway.access.guard import Access
from gateway.admission import Admission
from gateway.client import (
    EngineAborted,
    EngineBrokeOff,
    EngineClient,
    EngineConnection,
    EngineError,
    EngineUnreachable,
    GatewayExhausted,
)
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.headers import filter_headers, request_id, to_engine
from gateway.heartbeat import Heartbeat
from gateway.metrics.gateway import UNKNOWN_MODEL, GatewayMetrics
from gateway.protocol import (
    BYTES_PER_TOKEN,
    GENERATION_PATHS,
    Generation,
    context_error,
    is_glm4,
    named_model,
    parse_generation,
)
from gateway.routing.router import Route, Router
from gateway.settings import Settings
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("gateway.proxy")

DEFAULT_CONTEXT_WINDOW = 1048576

_INFLATED = frozenset(("gzip", "deflate", "br", "zstd"))  # aiohttp inflates these while the body is read
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


def _dropped(exc: EngineError) -> bool:
    """The engine closed the connection (or answered what is not HTTP) before its answer's head: not a read
    timeout (it may be generating) and not the gateway's own cut at the drain deadline."""
    return isinstance(exc, EngineBrokeOff) and not isinstance(exc, EngineAborted)


def _too_large(limit: int) -> GatewayError:
    return GatewayError("body_too_large", f"Request body is larger than the gateway's limit of {limit} bytes.")


_Inner = Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]]


class Proxy:
    """Holds what the request path needs; ``handle`` is the aiohttp handler for proxied routes."""

    def __init__(
        self, settings: Settings, admission: Admission, pool: UpstreamPool, router: Router, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.pool = pool
        self.router = router
        self.metrics = metrics
        self.client = EngineClient(
            settings.upstream_connect_timeout, settings.upstream_read_timeout, settings.upstream_api_key
        )
        self.relay = relay.Relay(metrics, settings.upstream_read_timeout, settings.relay_splice)
        self.access: Access | None = None  # API keys and their limits, when configured
        self.on_finish: list[Callable[[Exchange], None]] = []  # after the metrics: the access log
        # in arrival order, so the first of each is the oldest (gateway_oldest_request_age_seconds)
        self.queued: dict[Exchange, None] = {}
        self.forwarded: dict[Exchange, None] = {}
        self.draining = False
        self.active = 0  # requests inside the handler, queued ones included: drain waits for 0
        self.idle = asyncio.Event()
        self.idle.set()

    # -- receive ------------------------------------------------------------------------------------

    async def _read_body(self, request: web.Request, ex: Exchange) -> bytearray:
        """Read the body, counting bytes ourselves: chunked bodies have no Content-Length to check.  A gzip,
        deflate, br or zstd body is inflated as it is read (the limit counts what it inflates to) and
        forwarded as identity; any other Content-Encoding is refused."""
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        encoding = request.headers.get("Content-Encoding")
        if encoding is not None and encoding.lower() not in _INFLATED and encoding.lower() != "identity":
            raise GatewayError(
                "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported: send gzip or identity."
            )
        if not request.body_exists:
            return bytearray()
        buf = bytearray()
        content = request.content
        try:
            while chunk := await content.readany():
                buf += chunk
                if len(buf) > limit:
                    raise _too_large(limit)
        except web.RequestPayloadError:  # a body that does not inflate, or a broken chunked encoding
            what = f"valid {encoding} data" if encoding else "a well-formed HTTP body"
            raise GatewayError("invalid_request", f"The request body is not {what}.") from None
        ex.bytes_in = len(buf)
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
        return await self.serve(request, self._handle)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """The handler of every other path: counted and answered like any gateway-made error."""
        return await self.serve(request, self._not_found)

    async def _not_found(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        raise GatewayError("not_found", f"Not found: {request.method} {request.path}")

    async def serve(self, request: web.Request, inner: _Inner) -> web.StreamResponse:
        """Run ``inner`` as one request: timed, its errors answered as JSON, recorded (metrics, access log)."""
        ex = Exchange(
            perf_counter(), ENDPOINTS.get(request.path, "other"), request_id(request), request.method,
            request.path, request.remote or "",
        )  # fmt: skip
        self.active += 1
        self.idle.clear()
        try:
            return await inner(request, ex)
        except GatewayError as exc:
            ex.status, ex.error_type = exc.status, exc.error_type
            if exc.status >= 500:
                log.warning(
                    "request %s: %s: %s", ex.request_id, exc.error_type, exc.message,
                    extra={"request_id": ex.request_id, "upstream": ex.upstream},
                )  # fmt: skip
            return await self._fail(exc, ex)
        except (asyncio.CancelledError, ConnectionResetError):
            ex.status, ex.error_type = 499, "client_disconnected"
            raise
        except Exception:
            log.exception("request %s failed inside the gateway", ex.request_id, extra={"request_id": ex.request_id})
            error = GatewayError("internal_error", "The gateway failed to handle the request.")
            ex.status, ex.error_type = error.status, error.error_type
            return await self._fail(error, ex)
        finally:
            if ex.heartbeat is not None:
                ex.heartbeat.stop()
            self.active -= 1
            if not self.active:
                self.idle.set()
            self._record(ex)

    async def _fail(self, error: GatewayError, ex: Exchange) -> web.StreamResponse:
        """The error as JSON with its status; after a heartbeat sent the 200, as vLLM's error event."""
        beat = ex.heartbeat
        if beat is None or beat.response is None:
            response = error.response(ex.request_id)
            ex.bytes_out = len(response.body)  # type: ignore[arg-type]
            return response
        await relay.end_with_error(beat.response, error.body(), ex)
        return beat.response

    async def _handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        if self.draining:
            raise GatewayError("draining", "The gateway is shutting down. Retry on another instance.", retry_after=1)
        access, key = self.access, None
        if access is not None:
            key = access.authenticate(request, ex)  # before the body: a 401 does not wait for an upload
        body = await self._read_body(request, ex)
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
            self.pool.serving(gen.model)  # an unknown model is a 404 now, not after a wait in the queue
            window = self.context_window(gen.model)
            error = context_error(window, gen)
            if error is not None:
                raise error
            ex.prompt_tokens = gen.prompt_tokens
            cost = gen.prompt_tokens + gen.output_budget(window)
            body = gen.body
        elif admitted:  # embeddings, responses, Anthropic messages, batches: the model checked, bytes charged
            if request.path.rstrip("/") in GENERATION_PATHS:
                raise GatewayError("not_found", f"Not found: POST {request.path} (without the trailing slash?)")
            model = named_model(body)
            ex.model = self.model_label(model)
            self.pool.serving(model)
            cost = len(body) // BYTES_PER_TOKEN
        if not admitted:
            return await self._forward(request, body, gen, ex, self.router.plain(gen.model if gen else ""))
        if access is not None and key is not None:
            await access.charge(request, key, gen, cost, ex)  # settled in access.finish
        if gen is not None and gen.stream and self.settings.stream_heartbeat:
            ex.heartbeat = Heartbeat(request, ex.request_id, self.settings.stream_heartbeat, ex.start)
        ex.phase = "queued"
        self.queued[ex] = None
        try:
            route = await self._admit(cost, gen, request, ex)
        finally:
            del self.queued[ex]
        ex.phase = "prefill"
        self.forwarded[ex] = None
        try:
            return await self._forward(request, body, gen, ex, route)
        finally:
            del self.forwarded[ex]
            self._give_back(cost, ex, route)

    def _give_back(self, cost: int, ex: Exchange, route: Route) -> None:
        self.admission.release(cost, ex.key)
        self.router.release(route)

    async def _acquire(self, cost: int, gen: Generation | None, request: web.Request, ex: Exchange) -> Route:
        """A slot from admission, then an engine with KV room (routing): the wait for both is the queue wait."""
        model = gen.model if gen else ""
        self.router.check(cost, model)  # larger than every engine's KV cache: refused before any wait
        waited = await self.admission.acquire(cost, ex.key)
        start = perf_counter()
        try:
            key = self.router.key(request.headers, gen)
            route = await self.router.admit(cost, model, key, self.settings.queue_timeout - waited)
        except BaseException:
            self.admission.release(cost, ex.key)
            raise
        ex.queue_wait = waited + perf_counter() - start
        return route

    async def _admit(self, cost: int, gen: Generation | None, request: web.Request, ex: Exchange) -> Route:
        admission = self.admission
        acquire = self._acquire(cost, gen, request, ex)
        beat = ex.heartbeat
        if beat is None:
            return await acquire
        ahead, granted = admission.queue_depth, admission.granted

        def queued() -> str:
            position = admission.position(ahead, granted)
            return f"queued position={position} eta={math.ceil(admission.eta(position))}s"

        return await beat.wait(acquire, queued)

    # -- forward --------------------------------------------------------------------------------------

    async def _connect(
        self, request: web.Request, body: bytes | bytearray, gen: Generation | None, ex: Exchange, route: Route
    ) -> tuple[Upstream, EngineConnection]:
        """Send the request to the route's engines in turn.  An engine that refuses the connection, or that
        answers 503 (its own queue is full) while another ready engine is left, is skipped: it did no work.
        Never after the request was written and the connection then failed: the engine may have read it."""
        headers = to_engine(request, ex.request_id, generation=gen is not None, keyed=self.access is not None)
        target = request.raw_path
        if not target.startswith("/"):  # absolute-form: the engine gets the path alone
            target = request.rel_url.raw_path_qs
        reason = "no upstream configured"
        router = self.router
        upstream = route.candidates[0] if route.candidates else None
        while upstream is not None:
            upstream.in_flight += 1
            try:
                resp = await self.client.request(upstream.url, request.method, target, headers, body)
            except GatewayExhausted as exc:  # the gateway's own fds or memory: the engine stays up
                upstream.in_flight -= 1
                error = f"The gateway is out of resources ({exc})."
                raise GatewayError("gateway_overloaded", error, retry_after=1) from None
            except EngineUnreachable as exc:
                upstream.in_flight -= 1
                reason = f"{upstream.name}: {exc}"
                self.pool.mark_down(upstream, reason)
                router.failed(upstream, reason)
                upstream = router.retry(route, upstream, "unreachable")  # nothing was sent: safe to try the next
                continue
            except EngineError as exc:
                upstream.in_flight -= 1
                router.failed(upstream, str(exc))
                if _dropped(exc) and (following := router.retry(route, upstream, "reset")):
                    upstream = following  # dropped before its answer's head: vLLM aborted it there, if alive
                    continue
                ex.upstream = upstream.name
                raise relay.engine_error(exc, self.settings.upstream_read_timeout) from None
            except BaseException:
                upstream.in_flight -= 1
                raise
            router.answered(upstream, resp.status)
            if resp.status == 503 and (following := router.retry(route, upstream, "unavailable", ready=True)):
                resp.close()
                upstream.in_flight -= 1
                upstream = following
                continue
            ex.upstream = upstream.name
            return upstream, resp
        raise GatewayError("upstream_unavailable", f"No engine could be reached ({reason}).")

    async def _forward(
        self, request: web.Request, body: bytes | bytearray, gen: Generation | None, ex: Exchange, route: Route
    ) -> web.StreamResponse:
        sent = perf_counter()
        beat = ex.heartbeat
        connect = self._connect(request, body, gen, ex, route)
        if beat is None:
            upstream, resp = await connect
        else:
            upstream, resp = await beat.wait(connect, lambda: f"prefill elapsed={perf_counter() - sent:.0f}s")
        ex.first_byte_at = perf_counter()  # a stream moves it to its first event: vLLM sends headers at once
        try:
            headers = filter_headers(resp.headers, ex.request_id)
            if resp.status == 503 and "Retry-After" not in resp.headers:  # every engine that could take it is full
                headers.append(("Retry-After", str(max(1, math.ceil(self.admission.retry_after())))))
            early = beat.response if beat is not None else None
            if early is not None and (resp.status != 200 or resp.content_type != relay.SSE):
                out = await self.relay.late_failure(early, resp, ex)
            elif resp.content_type == relay.SSE and gen is not None:
                out = await self.relay.events(request, resp, headers, gen, ex, sent)
            elif resp.content_length is not None and resp.content_length <= _INLINE_BODY_MAX:
                out = await self.relay.whole(request, resp, headers, gen, ex)
            else:
                out = await self.relay.raw(request, resp, headers, ex)
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

    # -- record ---------------------------------------------------------------------------------------

    def _record(self, ex: Exchange) -> None:
        m, model, endpoint = self.metrics, ex.model, ex.endpoint
        child = m.child
        status = str(ex.status)
        ex.duration = perf_counter() - ex.start
        child(m.requests, model, endpoint, status, ex.key).inc()
        child(m.duration, model, endpoint, status).observe(ex.duration)
        if ex.error_type is not None:
            child(m.errors, model, endpoint, ex.error_type, ex.key).inc()
        # prompt tokens only for answered requests, whose count the engine's usage gives
        prompt_tokens = ex.prompt_tokens if ex.completion_tokens is not None else None
        for histogram, observed in (
            (m.queue_wait, ex.queue_wait),
            (m.first_byte, ex.first_byte),
            (m.relay, ex.relay),
            (m.completion_tokens, ex.completion_tokens),
            (m.prompt_tokens, prompt_tokens),
        ):
            if observed is not None:
                child(histogram, model, endpoint).observe(observed)
        if ex.ttft is not None:
            child(m.ttft, model, endpoint, m.prompt_band(ex.prompt_tokens)).observe(ex.ttft)
        if ex.phase == "decode" and ex.prompt_tokens and ex.first_byte:  # a stream: the engine's prefill speed
            child(m.prefill_speed, model).observe(ex.prompt_tokens / ex.first_byte)
        if ex.error_type == "client_disconnected":
            phase = "queued" if ex.phase == "received" else ex.phase
            child(m.client_disconnects, phase).inc()
            if ex.prompt_tokens:
                child(m.aborted_tokens, phase).inc(ex.prompt_tokens)
        for finish in self.on_finish:
            finish(ex)

    def oldest_age(self, phase: str) -> float:
        """Seconds the oldest queued or forwarded request has been in the gateway (0 when none)."""
        waiting = self.queued if phase == "queued" else self.forwarded
        oldest = next(iter(waiting), None)
        return perf_counter() - oldest.start if oldest is not None else 0.0
