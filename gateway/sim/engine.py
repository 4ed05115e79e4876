"""The simulated vLLM engine: vLLM's OpenAI routes, SSE, errors and metrics, with switchable faults."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from gateway import __version__
from gateway.settings import SimSettings
from gateway.sim.generations import BLOCK_SIZE, BUSY, GENERATIONS, EngineError
from gateway.sim.metrics import VllmMetrics
from gateway.sim.tokens import PrefixCache, chat_tokens, prompt_tokens, tokenize

log = logging.getLogger("gateway.sim")

WORDS = "the gateway relays every token of the answer as the engine makes it ".split()
KEEP_ALIVE = b": keep-alive\n\n"
GUARDED = ("/v1", "/v2", "/inference", "/cohere")  # what vLLM's --api-key guards; /health, /metrics stay open


@dataclass
class Faults:
    """Misbehaviour switched on at start or through ``POST /admin/faults``."""

    error_rate: float = 0.0  # share of generation requests answered with error_status
    error_status: int = 500
    latency: float = 0.0  # seconds added before the engine starts on a request
    drop_after_tokens: int = -1  # close the connection after this many streamed tokens; -1 = never
    hang: bool = False  # accept requests and never answer
    refuse_seconds: float = 0.0  # stop listening and drop open connections for this long (admin endpoint)
    metrics_delay: float = 0.0  # seconds /metrics takes to answer
    finish_reason: str = ""  # end every generation with this finished_reason (stop, length, error, repetition)

    def update(self, values: dict[str, Any], reasons: tuple[str, ...]) -> None:
        known = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r}")
            setattr(self, key, type(getattr(self, key))(value))
        if self.finish_reason not in ("", *(r for r in reasons if r != "abort")):
            raise ValueError(f"finish_reason {self.finish_reason!r} is not one this generation has")


class SimEngine:
    """One simulated engine: a scheduler with ``max_num_seqs`` slots and token-by-token generation."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.generation = GENERATIONS[settings.vllm_compat]
        self.fingerprint = self.generation.fingerprint(settings.model, settings.max_model_len)
        self.faults = Faults()
        self.metrics = VllmMetrics(settings.model, settings.max_model_len, settings.kv_cache_tokens, self.generation)
        self.prefix_cache = PrefixCache(settings.kv_cache_tokens // BLOCK_SIZE)
        self.slots = asyncio.Semaphore(settings.max_num_seqs)
        self.running = 0
        self.peak_running = 0  # the most requests generating at once since start or POST /admin/reset
        self.waiting = 0
        self.unfinished = 0  # admitted and not yet ended (waiting, running, or writing their answer)
        self.kv_tokens = 0
        self.journal: deque[dict[str, Any]] = deque(maxlen=1000)  # what reached the engine, for tests
        self.aborted = 0
        self.health_checks = 0  # GET /health (and /ping) answered: how often gateways check it
        self.port = settings.port
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self._reopen: asyncio.TimerHandle | None = None
        self._relisten: asyncio.Future[None] | None = None

    # -- the OpenAI surface ----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"sim-{__version__}"})

    async def models(self, request: web.Request) -> web.Response:
        s = self.settings
        card = {
            "id": s.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": s.model,
            "parent": None,
            "max_model_len": s.max_model_len,
            "permission": [],
        }
        return web.json_response({"object": "list", "data": [card]}, dumps=self.generation.dumps)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") and body["model"] != self.settings.model:
            return self.generation.respond(self.generation.not_found(body["model"], self.settings.model))
        count = len(chat_tokens(body["messages"]) if "messages" in body else tokenize(body.get("prompt", "")))
        return web.json_response(
            {"count": count, "max_model_len": self.settings.max_model_len, "tokens": list(range(count))}
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt": " ".join(WORDS[t % len(WORDS)] for t in body.get("tokens", []))})

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.faults.metrics_delay:
            await asyncio.sleep(self.faults.metrics_delay)
        m = self.metrics
        m.scheduler(self.running, self.waiting, self.kv_tokens, self.settings.kv_cache_tokens)
        return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
        except ValueError:
            return self.generation.respond(EngineError(400, "Invalid JSON body"))
        entry = {
            "path": request.path,
            "request_id": request.headers.get("X-Request-Id"),
            "headers": dict(request.headers),
            "body": body,
            "outcome": "running",
        }
        self.journal.append(entry)
        f = self.faults
        if f.hang:
            entry["outcome"] = "hang"
            await asyncio.Event().wait()
        if f.latency:
            await asyncio.sleep(f.latency)
        if f.error_rate and random.random() < f.error_rate:
            entry["outcome"] = f"error {f.error_status}"
            return self.generation.respond(
                EngineError(f.error_status, "simulated engine failure", "InternalServerError")
            )
        try:
            run = self._admit(request, body, chat, entry)
        except EngineError as error:
            entry["outcome"] = "busy" if error is BUSY else "rejected"
            return self.generation.respond(error)
        return await run.execute()

    def _admit(self, request: web.Request, body: dict[str, Any], chat: bool, entry: dict[str, Any]) -> _Run:
        """vLLM's checks in vLLM's order (model, the engine's queue, the window), then the run; raises the
        engine's error answer."""
        s, g = self.settings, self.generation
        model = body.get("model")
        if model and model != s.model:
            raise g.not_found(model, s.model)
        if s.max_num_queued_reqs and self.unfinished + 1 > s.max_num_queued_reqs:
            self.metrics.rejected("max_num_queued_reqs")
            raise BUSY
        tokens, text = prompt_tokens(chat, body)
        param, limit = g.output_limit(chat, body)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise g.error(400, f"{param} must be an integer", param=param)
        max_tokens = g.fit(s.max_model_len, len(tokens), limit, param, text)
        entry["prompt_tokens"] = len(tokens)
        entry["max_tokens"] = max_tokens  # as the engine runs it: 0.33 lowers it to what fits the window
        if max_tokens is not None:
            completion, finish = max_tokens, "length"
        else:
            completion = min(s.output_tokens, s.max_model_len - len(tokens))
            finish = "stop" if completion == s.output_tokens else "length"
        return _Run(self, request, body, chat, tokens, completion, self.faults.finish_reason or finish, entry)

    # -- the admin surface, for tests and demos ---------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await request.json(), self.generation.finished_reasons)
        except (ValueError, TypeError) as exc:
            return self.generation.respond(EngineError(400, str(exc)))
        if self.faults.refuse_seconds > 0:
            asyncio.get_running_loop().call_soon(self._refuse, self.faults.refuse_seconds)
            self.faults.refuse_seconds = 0.0
        return web.json_response(asdict(self.faults))

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "running": self.running,
                "peak_running": self.peak_running,
                "waiting": self.waiting,
                "aborted": self.aborted,
                "health_checks": self.health_checks,
                "vllm_compat": self.settings.vllm_compat,
                "requests": list(self.journal),
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        """Faults off, journal, peak and prefix cache cleared (the metrics keep counting, as vLLM's do)."""
        self.faults = Faults()
        self.journal.clear()
        self.peak_running = self.running
        self.prefix_cache.clear()
        return web.json_response({})

    def _refuse(self, seconds: float) -> None:
        """Stop listening (connections are refused, as while vLLM loads a model), then listen again."""
        if self.site is None or self._reopen is not None:
            return
        server = self.site._server  # the listening socket of aiohttp's TCPSite
        if server is not None:
            server.close()
        if self.runner is not None and self.runner.server is not None:
            for connection in self.runner.server.connections:
                connection.force_close()  # as a restarting engine: open connections drop too
        log.warning("sim: refusing connections for %.1f s", seconds)
        self._reopen = asyncio.get_running_loop().call_later(seconds, self._listen_again)

    def _listen_again(self) -> None:
        self._reopen = None
        if self.runner is not None:
            self._relisten = asyncio.ensure_future(self.listen(self.runner, self.settings.host, self.port))

    async def listen(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.site = web.TCPSite(runner, host, port, backlog=4096)
        await self.site.start()
        self.port = bound_port(runner)

    @web.middleware
    async def authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """vLLM's --api-key: a Bearer key on the guarded prefixes, 401 ``{"error":"Unauthorized"}`` otherwise."""
        key = self.settings.api_key
        if key and request.method != "OPTIONS" and request.path.startswith(GUARDED):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), key.encode()):
                return web.json_response({"error": "Unauthorized"}, status=401, dumps=self.generation.dumps)
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self.authenticate])
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/ping", self.health),
                web.post("/ping", self.health),
                web.get("/version", self.version),
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.generate),
                web.post("/v1/completions", self.generate),
                web.post("/tokenize", self.tokenize),
                web.post("/detokenize", self.detokenize),
                web.get("/metrics", self.metrics_page),
                web.get("/admin/faults", self.get_faults),
                web.post("/admin/faults", self.set_faults),
                web.get("/admin/state", self.state),
                web.post("/admin/reset", self.reset),
            ]
        )
        return app


class _Run:
    """One request inside the engine: wait for a slot, prefill, decode, answer; abort if the client leaves."""

    def __init__(
        self,
        engine: SimEngine,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        tokens: list[Any],
        completion_tokens: int,
        finish: str,
        entry: dict[str, Any],
    ) -> None:
        self.engine = engine
        self.request = request
        self.body = body
        self.chat = chat
        self.tokens = tokens
        self.prompt_tokens = len(tokens)
        self.cached_tokens = 0
        self.completion_tokens = completion_tokens
        self.finish = finish
        self.entry = entry
        self.id = ("chatcmpl-" if chat else "cmpl-") + (request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        self.created = int(time.time())
        self.model = body.get("model") or engine.settings.model
        self.arrived = time.monotonic()

    async def execute(self) -> web.StreamResponse:
        self.engine.unfinished += 1
        try:
            return await self._execute()
        finally:
            self.engine.unfinished -= 1

    async def _execute(self) -> web.StreamResponse:
        if not self.body.get("stream"):
            async with self._scheduled() as started:
                await self._prefill(started)
                decode_start = time.monotonic()
                await asyncio.sleep(self.engine.settings.itl * max(0, self.completion_tokens - 1))
                self._decoded(decode_start)
            if self.finish == "error":  # vLLM turns an ``error`` finish into a 500
                return self.engine.generation.respond(EngineError(500, "Internal server error", "InternalServerError"))
            return self._completion()
        # vLLM's StreamingResponse sends its headers before the request is even scheduled
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(self.request)
        interval = self.engine.settings.sse_keep_alive_interval
        events = _with_keep_alive(self._events(), interval) if interval else self._events()
        async with contextlib.aclosing(events):
            async for event in events:
                await response.write(event)
        await response.write_eof()
        return response

    @contextlib.asynccontextmanager
    async def _scheduled(self) -> AsyncIterator[float]:
        """Hold one of the engine's slots (waiting for it first); yields the time it was taken. A request that
        ends by an exception (the client left, the drop fault) is an abort; one that ends normally finished."""
        engine, m = self.engine, self.engine.metrics
        engine.waiting += 1
        try:
            await engine.slots.acquire()
        except asyncio.CancelledError:
            self._aborted()
            raise
        finally:
            engine.waiting -= 1
        engine.running += 1
        engine.peak_running = max(engine.peak_running, engine.running)
        engine.kv_tokens += self.prompt_tokens
        started = time.monotonic()
        m.queue_time.observe(started - self.arrived)
        try:
            yield started
        except BaseException:  # cancelled, reset, or the stream closed under it (GeneratorExit)
            self._aborted()
            raise
        finally:
            engine.running -= 1
            engine.kv_tokens -= self.prompt_tokens
            engine.slots.release()
        now = time.monotonic()
        m.e2e.observe(now - self.arrived)
        m.inference_time.observe(now - started)
        m.completed(self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.finish)
        self.entry["outcome"] = self.finish

    def _aborted(self) -> None:
        self.engine.aborted += 1
        self.engine.metrics.finished("abort")
        if self.entry["outcome"] != "dropped":  # the engine's own drop fault is not the client's abort
            self.entry["outcome"] = "abort"

    async def _prefill(self, started: float) -> None:
        s, m = self.engine.settings, self.engine.metrics
        self.cached_tokens = self.engine.prefix_cache.lookup_and_store(self.tokens)
        await asyncio.sleep(s.ttft + self.prompt_tokens / s.prefill_tokens_per_s)
        now = time.monotonic()
        m.prefilled(self.prompt_tokens, self.cached_tokens)
        m.ttft.observe(now - started)
        m.prefill_time.observe(now - started)

    def _text(self, i: int) -> str:
        return WORDS[i % len(WORDS)] + " "

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def _stamped(self) -> dict[str, Any]:
        """0.33's ``system_fingerprint`` (on responses, the last chunk and the usage chunk); nothing in 0.11."""
        fingerprint = self.engine.fingerprint
        return {} if fingerprint is None else {"system_fingerprint": fingerprint}

    def _completion(self) -> web.Response:
        text = "".join(self._text(i) for i in range(self.completion_tokens))
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "reasoning_content": None,
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": self.finish,
                "stop_reason": None,
            }
            kind = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": self.finish,
                "stop_reason": None,
            }
            kind = "text_completion"
        body = self._envelope(kind, [choice], usage=self._usage(), **self._stamped())
        return web.json_response(body, dumps=self.engine.generation.dumps)

    def _envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """vLLM's response object around its choices: a completion, a stream chunk or the usage chunk."""
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _event(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps(self._envelope(kind, choices, **extra), separators=(",", ":")).encode() + b"\n\n"

    def _decoded(self, decode_start: float) -> None:
        m = self.engine.metrics
        m.decode_time.observe(time.monotonic() - decode_start)
        m.generation_tokens.inc(self.completion_tokens)

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None, **extra: Any) -> bytes:
        key = "delta" if self.chat else "text"
        choice = {"index": 0, key: delta, "logprobs": None, "finish_reason": finish}
        return self._event(self._chunk_kind, [choice], **extra)

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    async def _events(self) -> AsyncIterator[bytes]:
        """The stream's SSE events, from the wait for a slot to ``[DONE]``."""
        s, f, m = self.engine.settings, self.engine.faults, self.engine.metrics
        usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        async with self._scheduled() as started:
            await self._prefill(started)
            decode_start = last = time.monotonic()
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""}, None)
            for i in range(self.completion_tokens):
                if i:
                    await asyncio.sleep(s.itl)
                    now = time.monotonic()
                    m.itl.observe(now - last)
                    last = now
                if i == f.drop_after_tokens:
                    self.entry["outcome"] = "dropped"
                    assert self.request.transport is not None
                    self.request.transport.abort()  # a reset mid-stream, as when an engine dies
                    raise ConnectionResetError("simulated drop")
                if i < self.completion_tokens - 1:
                    finish, extra = None, {}
                else:  # the last token: its finish_reason, and the fingerprint unless a usage chunk follows
                    finish, extra = self._last_finish(), ({} if usage else self._stamped())
                delta: dict[str, Any] | str = {"content": self._text(i)} if self.chat else self._text(i)
                yield self._chunk(delta, finish, **extra)
            self._decoded(decode_start)
        if self.finish == "error":  # vLLM's error event after the 200: the request failed inside the engine
            error = {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
            yield b"data: " + self.engine.generation.dumps({"error": error}).encode() + b"\n\n"
        elif usage:
            yield self._event(self._chunk_kind, [], usage=self._usage(), **self._stamped())
        yield b"data: [DONE]\n\n"

    def _last_finish(self) -> str | None:
        return None if self.finish == "error" else self.finish


async def _with_keep_alive(events: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """vLLM 0.33's ``with_sse_keep_alive``: a ``: keep-alive`` comment whenever ``events`` is idle ``interval`` s
    (queued for a slot, in prefill, between tokens). One retained task advances ``events``, never cancelled by a
    timeout, only when the stream ends."""
    pending: asyncio.Task[bytes] = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEP_ALIVE
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(events))
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        await events.aclose()  # type: ignore[attr-defined]


async def serve(engine: SimEngine, host: str, port: int) -> web.AppRunner:
    """Start the engine's app on host:port (port 0 picks one); returns the runner to clean up."""
    runner = web.AppRunner(engine.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await engine.listen(runner, host, port)
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner actually listens on (after binding port 0)."""
    for addr in runner.addresses:
        if addr:
            return int(addr[1])
    raise RuntimeError("not listening")
