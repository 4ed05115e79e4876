"""The simulated vLLM engine: vLLM's OpenAI routes, SSE, errors and metrics, with switchable faults."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from gateway import __version__
from gateway.protocol import context_error
from gateway.settings import SimSettings
from gateway.sim.metrics import VllmMetrics

log = logging.getLogger("gateway.sim")

# A stand-in tokenizer with BPE's shape: up to 4 ASCII letters, one digit or symbol, or up to 2 other
# characters per token, whitespace folded into the next token.  GLM-4's chat template adds 2 tokens
# per message and 3 around the conversation ([gMASK]<sop> ... <|assistant|>).
_TOKEN = re.compile(r"[A-Za-z]{1,4}|[0-9]|[^\x00-\x7f]{1,2}|[^\sA-Za-z0-9\x80-\U0010ffff]")
WORDS = "the gateway relays every token of the answer as the engine makes it ".split()


def count_tokens(text: str) -> int:
    return sum(1 for _ in _TOKEN.finditer(text))


def chat_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 3
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += 2 + count_tokens(content or "")
    return total


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

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r}")
            setattr(self, key, type(getattr(self, key))(value))


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class SimEngine:
    """One simulated engine: a scheduler with ``max_num_seqs`` slots and token-by-token generation."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.faults = Faults()
        self.metrics = VllmMetrics(settings.model, settings.max_model_len)
        self.slots = asyncio.Semaphore(settings.max_num_seqs)
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0
        self.journal: deque[dict[str, Any]] = deque(maxlen=1000)  # what reached the engine, for tests
        self.aborted = 0
        self.port = settings.port
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self._reopen: asyncio.TimerHandle | None = None
        self._relisten: asyncio.Future[None] | None = None

    # -- the OpenAI surface ----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
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
        return web.json_response({"object": "list", "data": [card]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "messages" in body:
            count = chat_prompt_tokens(body["messages"])
        else:
            count = count_tokens(body.get("prompt", ""))
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
        m.running.set(self.running)
        m.waiting.set(self.waiting)
        m.kv_usage.set(min(1.0, self.kv_tokens / self.settings.kv_cache_tokens))
        return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Invalid JSON body")
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
            return _error(f.error_status, "simulated engine failure", "InternalServerError")

        s = self.settings
        if chat:
            prompt_tokens = chat_prompt_tokens(body.get("messages") or [])
        else:
            prompt = body.get("prompt", "")
            prompt_tokens = len(prompt) if isinstance(prompt, list) else count_tokens(prompt)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        rejection = context_error(s.max_model_len, prompt_tokens, max_tokens)
        if rejection is not None:
            entry["outcome"] = "rejected"
            return _error(400, rejection.message)
        entry["prompt_tokens"] = prompt_tokens
        completion_tokens = max_tokens if max_tokens is not None else s.output_tokens
        finish = "length" if max_tokens is not None else "stop"
        run = _Run(self, request, body, chat, prompt_tokens, completion_tokens, finish, entry)
        return await run.execute()

    # -- the admin surface, for tests and demos ---------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await request.json())
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        if self.faults.refuse_seconds > 0:
            asyncio.get_running_loop().call_soon(self._refuse, self.faults.refuse_seconds)
            self.faults.refuse_seconds = 0.0
        return web.json_response(asdict(self.faults))

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "running": self.running,
                "waiting": self.waiting,
                "aborted": self.aborted,
                "requests": list(self.journal),
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        self.faults = Faults()
        self.journal.clear()
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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
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
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
        entry: dict[str, Any],
    ) -> None:
        self.engine = engine
        self.request = request
        self.body = body
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.finish = finish
        self.entry = entry
        self.id = ("chatcmpl-" if chat else "cmpl-") + (request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        self.created = int(time.time())
        self.model = body.get("model") or engine.settings.model

    async def execute(self) -> web.StreamResponse:
        engine, m = self.engine, self.engine.metrics
        arrived = time.monotonic()
        stream = None
        if self.body.get("stream"):
            # vLLM's StreamingResponse sends its headers before the request is even scheduled
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await stream.prepare(self.request)
        engine.waiting += 1
        try:
            await engine.slots.acquire()
        except asyncio.CancelledError:
            engine.waiting -= 1
            self._aborted()
            raise
        engine.waiting -= 1
        engine.running += 1
        engine.kv_tokens += self.prompt_tokens
        started = time.monotonic()
        m.queue_time.observe(started - arrived)
        try:
            if stream is not None:
                response = await self._stream(stream, started)
            else:
                response = await self._complete(started)
        except (asyncio.CancelledError, ConnectionResetError):
            self._aborted()
            raise
        finally:
            engine.running -= 1
            engine.kv_tokens -= self.prompt_tokens
            engine.slots.release()
        m.e2e.observe(time.monotonic() - arrived)
        m.inference_time.observe(time.monotonic() - started)
        m.prompt_hist.observe(self.prompt_tokens)
        m.generation_hist.observe(self.completion_tokens)
        m.prompt_tokens.inc(self.prompt_tokens)
        engine.metrics.finished(self.finish)
        self.entry["outcome"] = self.finish
        return response

    def _aborted(self) -> None:
        self.engine.aborted += 1
        self.engine.metrics.finished("abort")
        if self.entry["outcome"] != "dropped":  # the engine's own drop fault is not the client's abort
            self.entry["outcome"] = "abort"

    async def _prefill(self, started: float) -> None:
        s = self.engine.settings
        await asyncio.sleep(s.ttft + self.prompt_tokens / s.prefill_tokens_per_s)
        now = time.monotonic()
        self.engine.metrics.ttft.observe(now - started)
        self.engine.metrics.prefill_time.observe(now - started)

    def _text(self, i: int) -> str:
        return WORDS[i % len(WORDS)] + " "

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def _complete(self, started: float) -> web.Response:
        s = self.engine.settings
        await self._prefill(started)
        decode_start = time.monotonic()
        await asyncio.sleep(s.itl * max(0, self.completion_tokens - 1))
        self._decoded(decode_start)
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
        return web.json_response(self._envelope(kind, [choice], usage=self._usage()))

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

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None) -> bytes:
        key = "delta" if self.chat else "text"
        return self._event(self._chunk_kind, [{"index": 0, key: delta, "logprobs": None, "finish_reason": finish}])

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    async def _stream(self, response: web.StreamResponse, started: float) -> web.StreamResponse:
        s, f, m = self.engine.settings, self.engine.faults, self.engine.metrics
        await self._prefill(started)
        decode_start = last = time.monotonic()
        if self.chat:
            await response.write(self._chunk({"role": "assistant", "content": ""}, None))
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
            finish = self.finish if i == self.completion_tokens - 1 else None
            delta: dict[str, Any] | str = {"content": self._text(i)} if self.chat else self._text(i)
            await response.write(self._chunk(delta, finish))
        self._decoded(decode_start)
        options = self.body.get("stream_options") or {}
        if options.get("include_usage"):
            await response.write(self._event(self._chunk_kind, [], usage=self._usage()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


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
