"""A fixed-answer engine: pre-built vLLM-shaped answers from a raw asyncio server, far cheaper than the sim.

Where the sim (``glm-gateway sim``) costs as much CPU per request as the proxy in front of it, the proxy's
scaling cannot show (bench/README.md, workload 10).  This engine parses only the request line, the
``Content-Length`` and, in a chat body, ``"stream"``, ``"max_tokens"`` and ``"include_usage"``, and
answers with bytes built once: a chat completion of N tokens, or an SSE stream of N content events
(one chunk each) paced by one timer for all streams every ``--itl`` seconds (0: the whole stream in one
write), plus ``/health``, ``/v1/models`` and a ``/metrics`` of idle vLLM gauges and a 600,000-token KV cache,
so the gateway's routing takes its engine-view path.  ``python -m bench.engine --port P [--itl S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from functools import cache
from typing import cast

import uvloop

MODEL = "glm-4-9b-chat-1m"
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_MAX_TOKENS = re.compile(rb'"max_(?:completion_)?tokens"\s*:\s*(\d+)')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_WORD = "tok "


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: dict[str, object]) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _delta(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [choice]}  # fmt: skip


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}


HEALTH = _response("200 OK", "text/plain", b"")
NOT_FOUND = _response("404 Not Found", "application/json", b'{"detail":"Not Found"}')
MODELS = _response(
    "200 OK",
    "application/json",
    json.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 1048576}]}
    ).encode(),
)
# the load view the gateway reads (vllm:* gauges, idle, and the KV capacity): routing takes its engine path
METRICS = _response(
    "200 OK",
    "text/plain; version=0.0.4",
    "".join(
        f'# TYPE {name} gauge\n{name}{{engine="0",model_name="{MODEL}"{labels}}} {value}\n'
        for name, labels, value in (
            ("vllm:num_requests_running", "", 0.0),
            ("vllm:num_requests_waiting", "", 0.0),
            ("vllm:kv_cache_usage_perc", "", 0.0),
            ("vllm:cache_config_info", ',block_size="16",num_gpu_blocks="37500"', 1.0),
        )
    ).encode(),
)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"


@cache
def completion(tokens: int) -> bytes:
    message = {"role": "assistant", "content": _WORD * tokens}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [choice], "usage": _usage(tokens)}  # fmt: skip
    return _response("200 OK", "application/json", json.dumps(body).encode())


@cache
def stream_parts(tokens: int, usage: bool) -> tuple[bytes, bytes, bytes]:
    """The head with the role event, one content event, and the last content event with what follows it."""
    first = STREAM_HEAD + _event(_delta({"role": "assistant", "content": ""}))
    tail = _event(_delta({"content": _WORD}, "length"))
    if usage:
        tail += _event({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                        "choices": [], "usage": _usage(tokens)})  # fmt: skip
    tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return first, _event(_delta({"content": _WORD})), tail


class _Stream:
    __slots__ = ("left", "parts", "transport")

    def __init__(self, transport: asyncio.Transport, parts: tuple[bytes, bytes, bytes], tokens: int) -> None:
        self.transport = transport
        self.parts = parts
        self.left = tokens


class Engine:
    """The streams in progress, all advanced by one event each tick."""

    def __init__(self, itl: float) -> None:
        self.itl = itl
        self.streams: list[_Stream] = []
        self._ticking = False
        self._next = 0.0  # when the next tick is due: ticks keep to a grid, the loop's timers are only ms-exact

    def start(self, transport: asyncio.Transport, tokens: int, usage: bool) -> None:
        parts = stream_parts(tokens, usage)
        if self.itl <= 0 or tokens <= 1:
            transport.write(parts[0] + parts[1] * (tokens - 1) + parts[2])
            return
        transport.write(parts[0])
        self.streams.append(_Stream(transport, parts, tokens))
        if not self._ticking:
            self._ticking = True
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self.itl
            loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        alive = []
        for s in self.streams:
            if s.transport.is_closing():
                continue
            s.left -= 1
            if s.left <= 0:
                s.transport.write(s.parts[2])
            else:
                s.transport.write(s.parts[1])
                alive.append(s)
        self.streams = alive
        if alive:
            loop = asyncio.get_running_loop()
            self._next = max(self._next + self.itl, loop.time() - self.itl)  # a late tick is not made up twice
            loop.call_at(self._next, self._tick)
        else:
            self._ticking = False


class _Connection(asyncio.Protocol):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            m = _LENGTH.search(head)
            size = int(m[1]) if m else 0
            if len(self.buf) < end + 4 + size:
                return
            body = self.buf[end + 4 : end + 4 + size]
            self.buf = self.buf[end + 4 + size :]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            m = _MAX_TOKENS.search(body)
            tokens = max(1, int(m[1])) if m else 16
            if _STREAM.search(body):
                self.engine.start(self.transport, tokens, b"include_usage" in body)
            else:
                self.transport.write(completion(tokens))
        elif path == b"/health":
            self.transport.write(HEALTH)
        elif path == b"/v1/models":
            self.transport.write(MODELS)
        elif path == b"/metrics":
            self.transport.write(METRICS)
        else:
            self.transport.write(NOT_FOUND)


async def serve(host: str, port: int, itl: float) -> None:
    engine = Engine(itl)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(engine), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between a stream's events (0: at once)")
    ns = parser.parse_args()
    uvloop.run(serve(ns.host, ns.port, ns.itl))


if __name__ == "__main__":
    main()
