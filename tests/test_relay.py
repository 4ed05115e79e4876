"""The SSE relay once tokens flow (the engine connection's callback writes each event to the client): slow,
vanishing and half-closed clients, an engine that dies or stalls mid-stream, the drain's cut, comments, several
choices, the usage chunk, and the event framing itself under every way the engine's bytes can be split into reads.
Each client gets the whole stream in order, or the engine's request is aborted; nothing stays held in the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import re
import signal
import socket
import struct
from collections.abc import Iterator
from time import perf_counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.exchange import Exchange
from gateway.metrics.histogram import HistogramChild
from gateway.relay import _Events
from gateway.settings import SimSettings
from gateway.sim.engine import SimEngine, bound_port, serve
from tests import harness
from tests.harness import (
    CHAT,
    FAST_SIM,
    HELLO,
    MODEL,
    Gw,
    Process,
    Sim,
    client_in,
    error_body,
    free_port,
    gateway_in,
    settled,
    sim_in,
    start_sim,
    value,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.timeout(60)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test here that runs a gateway runs it with each of the relay's per-token paths."""
    if "stack" in metafunc.fixturenames:
        metafunc.parametrize("relay_splice", ["c", "python"], indirect=True)


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A client that leaves is the access log's 499, never a traceback from aiohttp's server in the log."""
    yield
    errors = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.ERROR]
    assert not errors, errors


@pytest.fixture(autouse=True)
def relay_splice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """--relay-splice for the gateways the test starts."""
    mode = getattr(request, "param", "auto")
    monkeypatch.setitem(harness.FAST_GATEWAY, "relay_splice", mode)
    return mode


TOKENS = 20_000  # about 4 MB of events: far more than the sockets' buffers between the gateway and the client
ENDLESS = 500_000  # a stream the engine cannot finish before the test is done with it
DONE = b"data: [DONE]\n\n"
EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "500"))


def request(version: str, max_tokens: int, **extra: Any) -> bytes:
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, "stream": True, **extra}).encode()
    head = f"POST {CHAT} HTTP/{version}\r\nHost: gw\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


class Client:
    """A raw HTTP/1.1 client that sent a streamed chat request and read the answer's head (a 200, chunked);
    ``raw`` is the chunked body read so far."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()

    async def read(self, size: int) -> None:
        """Read on until ``size`` bytes of the body have come."""
        while len(self.raw) < size:
            data = await self.reader.read(1 << 14)
            assert data, "the stream ended early"
            self.raw += data

    async def read_to_end(self) -> bytes:
        """The rest of the answer; the events of the whole body."""
        self.raw += await self.reader.read()
        self.writer.close()
        return dechunk(bytes(self.raw))


async def stream_from(gw: Gw, max_tokens: int, **extra: Any) -> Client:
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 14)
    writer.write(request("1.1", max_tokens, **extra))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, head
    return Client(reader, writer)


def reset(writer: asyncio.StreamWriter) -> None:
    """Leave with an RST (SO_LINGER 0), as a client process killed or a load balancer's idle cut does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def engine_connections(gw: Gw) -> list[Any]:
    return [conn for origin in gw.gateway.proxy.client._origins.values() for conn in origin.open]


def engine_reading_paused(gw: Gw) -> bool:
    """An engine connection of the gateway's with reading paused: the client's backpressure reached the engine."""
    return any(conn._paused for conn in engine_connections(gw))


def dechunk(raw: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            assert raw[end + 2 :] == b"\r\n", "the last chunk ends the answer"
            return bytes(out)
        out += raw[end + 2 : end + 2 + size]
        assert raw[end + 2 + size : end + 4 + size] == b"\r\n"
        at = end + 4 + size


def blocks(events: bytes) -> list[bytes]:
    """The SSE blocks of a whole answer, which ends with [DONE]."""
    out = events.split(b"\n\n")
    assert out[-2:] == [b"data: [DONE]", b""], out[-3:]
    return out[:-2]


def contents(events: bytes) -> list[str]:
    """The content of each token event, in order ([DONE] last; no usage chunk, no error event)."""
    out = []
    for block in blocks(events):
        chunk = json.loads(block.removeprefix(b"data: "))
        assert "usage" not in chunk or chunk["choices"], "the usage chunk the gateway asked for is taken out"
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            out.append(delta["content"])
    return out


def broken_off(events: bytes, code: str) -> list[str]:
    """A stream the gateway ended with an error event (``code``) and [DONE]: the tokens before it, in order."""
    *tokens, error = blocks(events)
    error_body(json.loads(error.removeprefix(b"data: ")), code=code, type="server_error")
    return contents(b"\n\n".join([*tokens, b"data: [DONE]", b""]))


def sim_words(count: int) -> list[str]:
    """The sim's first ``count`` tokens."""
    words = "the gateway relays every token of the answer as the engine makes it ".split()
    return [words[i % len(words)] + " " for i in range(count)]


async def disconnected(gw: Gw, sim: Sim) -> None:
    """The client left mid-stream: the engine aborted its request, counted once as a decode-phase disconnect."""
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the stream")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_client_disconnects_total", phase="decode") == 1
    assert value(text, "gateway_client_disconnects_total") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="499") == 1
    assert value(text, "gateway_request_errors_total", error_type="client_disconnected") == 1
    assert value(text, "gateway_request_errors_total") == 1
    assert value(text, "gateway_time_to_first_token_seconds_count", model=MODEL) == 1
    assert not engine_connections(gw), "the engine connection is closed, not kept"


# -- slow readers and HTTP/1.0 -----------------------------------------------------------------------------


async def test_a_slow_reader_pauses_the_engine_and_gets_every_event(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    client = await stream_from(gw, TOKENS)
    # nothing read: the client's buffers fill, the gateway's transport pauses writing, and the gateway stops
    # reading from the engine instead of buffering the stream in memory
    await wait_for(lambda: engine_reading_paused(gw), "the gateway to pause reading from the engine")
    tokens = contents(await client.read_to_end())  # now read it all: reading from the engine resumes
    assert tokens == sim_words(TOKENS)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == TOKENS
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == TOKENS - 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert sim.outcomes() == ["length"]


async def test_an_http_1_0_client_gets_the_stream_unchunked(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url])
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request("1.0", 50))
    raw = await reader.read()  # HTTP/1.0: the answer ends with the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
    assert len(contents(body)) == 50
    await settled(gw, sim)
    assert value(await gw.metrics(), "gateway_completion_tokens_sum", model=MODEL) == 50


async def test_a_reader_slower_than_the_read_timeout_is_not_a_silent_engine(
    stack: contextlib.AsyncExitStack,
) -> None:
    """The read timeout measures the engine's silence: an engine the gateway itself stopped reading from, for
    a client that reads slowly, is not silent."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url], upstream_read_timeout=0.2)
    client = await stream_from(gw, TOKENS)
    await wait_for(lambda: engine_reading_paused(gw), "the gateway to pause reading from the engine")
    await asyncio.sleep(1.0)  # the engine's events wait in the sockets for five read timeouts
    assert contents(await client.read_to_end()) == sim_words(TOKENS)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total") == 0
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == TOKENS
    assert sim.outcomes() == ["length"]


async def test_a_stream_that_flows_for_many_read_timeouts_is_not_a_silent_engine(
    stack: contextlib.AsyncExitStack,
) -> None:
    """A token every 20 ms for more than four read timeouts: each token restarts the engine's silence, whether
    the gateway relayed it from Python or the C splice did (its reads never reach the engine connection)."""
    sim = await sim_in(stack, itl=0.02)
    gw = await gateway_in(stack, [sim.url], upstream_read_timeout=0.25)
    client = await stream_from(gw, 60)
    assert contents(await client.read_to_end()) == sim_words(60)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total") == 0
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == 59
    assert sim.outcomes() == ["length"]


# -- clients that leave ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset while reading", "reset while not reading", "closed while not reading"])
async def test_a_client_that_leaves_mid_stream_aborts_the_engine(stack: contextlib.AsyncExitStack, how: str) -> None:
    sim = await sim_in(stack, itl=0.0)  # as fast as the engine can write
    gw = await gateway_in(stack, [sim.url])
    client = await stream_from(gw, ENDLESS)
    if how == "reset while reading":
        await client.read(1 << 18)  # a quarter of a MB of events relayed, the engine writing on
    else:
        await wait_for(lambda: engine_reading_paused(gw), "the gateway to pause reading from the engine")
    if how.startswith("reset"):
        reset(client.writer)
    else:
        client.writer.close()  # a FIN; the kernel resets it anyway, with the unread events in its buffer
    await disconnected(gw, sim)


async def test_an_openai_client_that_stops_iterating_aborts_the_engine(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=ENDLESS, stream=True)
    got = []
    async for chunk in stream:
        got.append(chunk.choices[0].delta.content)
        if len(got) == 2000:
            break
    await stream.close()
    assert got[1:] == sim_words(1999)  # the role chunk first
    await disconnected(gw, sim)


async def test_a_client_that_half_closes_after_its_request(stack: contextlib.AsyncExitStack) -> None:
    """A client that shuts its sending side once the request is out (a FIN, reading on) is treated as gone, as
    nginx treats it: a FIN on a connection with no pipelined request ends the stream and the engine's work."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    client = await stream_from(gw, ENDLESS)
    await client.read(1 << 14)  # tokens flow
    client.writer.write_eof()
    with contextlib.suppress(ConnectionError):
        while await client.reader.read(1 << 16):
            pass  # what the gateway wrote before it saw the FIN, then the end
    client.writer.close()
    await disconnected(gw, sim)


async def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(stack: contextlib.AsyncExitStack) -> None:
    """A client that keeps its connection open and reads nothing would hold its slot and the engine's sequence
    for good: once its socket is full it has --client-send-timeout to read, then it is dropped as one that left."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url], client_send_timeout=0.5)
    client = await stream_from(gw, ENDLESS)  # and never read from
    await disconnected(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_client_connections_closed_total", reason="send_timeout") == 1
    with contextlib.suppress(ConnectionError):
        while await client.reader.read(1 << 16):
            pass  # what the kernel held for it, then the end: the gateway closed the connection
    client.writer.close()


# -- the engine fails mid-stream, the drain cuts it --------------------------------------------------------


def error_at_the_end(events: bytes, code: str) -> None:
    """A stream the gateway ended with an error event (``code``) and [DONE], after whole events."""
    before, _, tail = events.rpartition(b"\n\ndata: {")
    error, done, end = (b"data: {" + tail).split(b"\n\n")
    assert (done, end) == (b"data: [DONE]", b"")
    error_body(json.loads(error.removeprefix(b"data: ")), code=code, type="server_error")
    json.loads(before[before.rindex(b"data: ") + 6 :])  # the last event before the error is whole


@pytest.mark.parametrize("when", ["while relaying", "while paused on the client"])
async def test_the_engine_dying_mid_stream_ends_it_with_an_error_event_and_done(
    stack: contextlib.AsyncExitStack, when: str
) -> None:
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    if when == "while relaying":
        await sim.faults(drop_after_tokens=5000)  # thousands of tokens written as fast as they come, then a reset
        client = await stream_from(gw, 10_000)
    else:
        client = await stream_from(gw, ENDLESS)
        await wait_for(lambda: engine_reading_paused(gw), "the gateway to pause reading from the engine")
        await sim.faults(refuse_seconds=0.5)  # the engine drops its connections (a restart) and comes back
    events = await client.read_to_end()
    error_at_the_end(events, "upstream_error")
    *tokens, _ = blocks(events)
    got = contents(b"\n\n".join([*tokens, b"data: [DONE]", b""]))
    assert got == sim_words(len(got))  # what reached the gateway before the engine went, in order
    assert sim.outcomes() == ["dropped" if when == "while relaying" else "abort"]
    await wait_for(lambda: gw.gateway.pool.any_up, "the engine to be up again")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_error") == 1
    assert value(text, "gateway_request_errors_total") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == len(got) - 1


async def test_the_engines_own_error_event_mid_stream_is_relayed_and_counted(stack: contextlib.AsyncExitStack) -> None:
    """vLLM reports a failure inside the engine after its 200 as an error event and [DONE]: relayed as sent (not
    a token), counted as the engine's error, the tokens before it counted."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    await sim.faults(finish_reason="error")
    client = await stream_from(gw, 3000)
    events = await client.read_to_end()
    *tokens, error = blocks(events)
    assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == 500  # the engine's own, untouched
    assert contents(b"\n\n".join([*tokens, b"data: [DONE]", b""])) == sim_words(3000)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_error") == 1
    assert value(text, "gateway_request_errors_total") == 1
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 3000
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == 2999


async def test_an_engine_that_stalls_mid_stream_meets_the_read_timeout(stack: contextlib.AsyncExitStack) -> None:
    """An engine process stopped (SIGSTOP: a hung GPU, a frozen host) after thousands of tokens: the read timeout
    ends the client's stream with an upstream_timeout error event and [DONE], and closes the engine connection,
    so the engine aborts the request once it runs again."""
    port = free_port()
    sim = Process("sim", "--port", str(port), "--itl", "0.0005", "--ttft", "0")
    stack.callback(sim.stop)
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_http, url + "/health")
    gw = await gateway_in(stack, [url], upstream_read_timeout=0.5, health_timeout=60.0)
    client = await stream_from(gw, ENDLESS)
    await client.read(1 << 18)  # thousands of tokens relayed
    sim.signal(signal.SIGSTOP)
    try:
        events = await client.read_to_end()
    finally:
        sim.signal(signal.SIGCONT)
    error_at_the_end(events, "upstream_timeout")
    await settled(gw)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_timeout") == 1
    assert value(text, "gateway_request_errors_total") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1

    async def engine_state() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(url + "/admin/state") as r:
            return await r.json()

    for _ in range(400):  # the engine runs again and finds its client gone (a hung test ends after 20 s)
        state = await engine_state()
        if not state["running"] and state["requests"][-1]["outcome"] == "abort":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the engine did not abort the stalled stream: {state['requests'][-1]['outcome']}")


@pytest.mark.parametrize("reading", [True, False])
async def test_the_drain_deadline_cuts_a_flowing_stream(stack: contextlib.AsyncExitStack, reading: bool) -> None:
    """At the drain's deadline the gateway cuts each stream at the engine (what SIGTERM's deadline calls;
    tests/test_abuse.py runs it as a process): a stream whose client reads, and one whose client reads nothing
    (the gateway paused on it), each end with a ``draining`` error event and [DONE] once the client reads."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    client = await stream_from(gw, ENDLESS)
    if reading:
        await client.read(1 << 16)
    else:
        await wait_for(lambda: engine_reading_paused(gw), "the gateway to pause reading from the engine")
    gw.gateway.proxy.client.abort("the gateway is shutting down")
    error_at_the_end(await client.read_to_end(), "draining")
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the stream")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="draining") == 1
    assert value(text, "gateway_request_errors_total") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1


# -- what the engine's stream carries: comments, several choices, the usage chunk ----------------------------


async def test_the_engines_keep_alive_comments_mid_stream_are_relayed_and_not_tokens(
    stack: contextlib.AsyncExitStack,
) -> None:
    sim = await sim_in(stack, vllm_compat="0.33", sse_keep_alive_interval=0.02, itl=0.2)
    gw = await gateway_in(stack, [sim.url])
    client = await stream_from(gw, 4)
    events = await client.read_to_end()
    after_first = events.split(b'"content":"the "', 1)[1]
    assert b"\n\n: keep-alive\n\n" in after_first  # between tokens, once they flow
    assert contents(b"\n\n".join(e for e in events.split(b"\n\n") if not e.startswith(b":"))) == sim_words(4)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 4
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == 3
    assert value(text, "gateway_time_to_first_token_seconds_count", model=MODEL) == 1
    assert sim.outcomes() == ["length"]


def choices_stream(lengths: list[int], usage: bool, fingerprint: str | None) -> list[bytes]:
    """A chat stream of several choices as vLLM sends it: each choice's role chunk, then one chunk per token of
    each choice in turn (one choice per chunk), choice ``i`` making ``lengths[i]`` tokens, its last chunk with
    its finish_reason (``length`` for the longest); the usage chunk when asked (``[]``), then [DONE].  vLLM
    0.33's system_fingerprint is on the usage chunk, or without it on the terminal chunks."""
    stamp = {} if fingerprint is None else {"system_fingerprint": fingerprint}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": "chatcmpl-n", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
        return b"data: " + json.dumps({**chunk, "choices": choices, **extra}, separators=(",", ":")).encode() + b"\n\n"

    def choice(index: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    out = [event([choice(i, {"role": "assistant", "content": ""}, None)]) for i in range(len(lengths))]
    words = sim_words(max(lengths))
    for t, word in enumerate(words):
        for i, made in enumerate(lengths):
            if t < made:
                last = t == made - 1
                finish = ("length" if made == len(words) else "stop") if last else None
                out.append(event([choice(i, {"content": word}, finish)], **(stamp if last and not usage else {})))
    if usage:
        counts = {"prompt_tokens": 9, "completion_tokens": sum(lengths), "total_tokens": 9 + sum(lengths)}
        out.append(event([], usage=counts, **stamp))
    return [*out, DONE]


class ChoicesEngine(SimEngine):
    """The sim, answering a streamed chat request with ``n`` > 1 as vLLM does (``choices_stream``: choice ``i``
    makes ``max_tokens >> i`` tokens, so each finishes before the one before it), an event per write; everything
    else as the sim."""

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream") or body.get("n", 1) == 1:
            return await super().generate(request)
        self.journal.append({"body": body, "outcome": "choices"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for event in choices_stream([body["max_tokens"] >> i for i in range(body["n"])], usage, self.fingerprint):
            await response.write(event)
            await asyncio.sleep(0)  # an event per write, as vLLM's uvicorn writes them
        await response.write_eof()
        return response


@pytest.mark.parametrize("include_usage", [False, True])
async def test_several_choices_are_relayed_and_counted(stack: contextlib.AsyncExitStack, include_usage: bool) -> None:
    engine = ChoicesEngine(SimSettings(**{"port": 0, **FAST_SIM}))
    runner = await serve(engine, "127.0.0.1", 0)
    stack.push_async_callback(runner.cleanup)
    sim = Sim(engine, runner, f"http://127.0.0.1:{bound_port(runner)}")
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    tokens = 1000  # choice 0 makes 1000, choice 1 500 and finishes first
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=tokens, n=2, stream=True, **extra
    )
    got: dict[int, list[str]] = {0: [], 1: []}
    finished: dict[int, str | None] = {}
    usage = []
    async for chunk in stream:
        if not chunk.choices:
            usage.append(chunk.usage)
            continue
        (choice,) = chunk.choices
        assert choice.index not in finished, "nothing of a choice after its terminal chunk"
        if choice.delta.content:
            got[choice.index].append(choice.delta.content)
        if choice.finish_reason is not None:
            finished[choice.index] = choice.finish_reason
            assert chunk.system_fingerprint == (None if include_usage else engine.fingerprint) or choice.index == 1
    assert got == {0: sim_words(tokens), 1: sim_words(tokens // 2)}
    assert finished == {0: "length", 1: "stop"}
    made = tokens + tokens // 2
    if include_usage:
        assert [u.completion_tokens for u in usage if u is not None] == [made]
    else:
        assert usage == [], "the usage chunk the gateway asked for is taken out"
    assert engine.journal[-1]["body"]["stream_options"] == {"include_usage": True}  # asked for either way
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == made
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == made - 1
    assert value(text, "gateway_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1


def created_anytime(events: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', events)


@pytest.mark.parametrize("compat", ["0.33", "0.11"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_the_client_gets_exactly_the_engines_stream_with_or_without_the_usage_chunk(
    stack: contextlib.AsyncExitStack, compat: str, include_usage: bool
) -> None:
    """The gateway always asks the engine for the usage chunk; the client gets what the engine would have sent
    it, byte for byte: the usage chunk passed through when the client asked, else taken out and 0.33's
    system_fingerprint on the terminal chunk where vLLM puts it without usage."""
    sim = await sim_in(stack, vllm_compat=compat, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    tokens = 3000
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": tokens, "stream": True, **extra}
    headers = {"X-Request-Id": "same-stream"}
    async with aiohttp.ClientSession() as s, s.post(sim.url + CHAT, json=body, headers=headers) as r:
        direct = await r.read()  # what the engine sends a client that asks it directly
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Request-Id: same-stream\r\n".encode()
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        + payload
    )
    head, _, raw = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    relayed = dechunk(raw)
    assert created_anytime(relayed) == created_anytime(direct)
    assert (b'"choices":[]' in relayed) == include_usage
    assert (b"system_fingerprint" in relayed) == (compat == "0.33")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == tokens
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == tokens - 1
    assert sim.journal[-1]["body"]["stream_options"] == {"include_usage": True}


# -- the event framing, under every way the engine's bytes can be split into reads -------------------------


async def recordings() -> dict[str, bytes]:
    """Streams as the sim sends them to the gateway (which always asks for the usage chunk)."""
    out: dict[str, bytes] = {}
    usage = {"stream_options": {"include_usage": True}}
    cases: list[tuple[str, dict[str, Any], str, dict[str, Any], dict[str, Any]]] = [
        ("0.33", {}, CHAT, {"max_tokens": 40}, {}),
        ("0.33", {}, CHAT, {"max_tokens": 1}, {}),
        ("0.33", {}, "/v1/completions", {"max_tokens": 30, "prompt": "Hello"}, {}),
        ("0.33", {"sse_keep_alive_interval": 0.002, "itl": 0.01}, CHAT, {"max_tokens": 5}, {}),
        ("0.33", {}, CHAT, {"max_tokens": 20}, {"finish_reason": "error"}),  # the engine's error event
        ("0.11", {}, CHAT, {"max_tokens": 40}, {}),
    ]
    for compat, options, path, request_body, faults in cases:
        sim = await start_sim(vllm_compat=compat, **{"itl": 0.0, **options})
        try:
            if faults:
                await sim.faults(**faults)
            body = {"model": MODEL, "stream": True, **usage, **request_body}
            if path == CHAT:
                body["messages"] = HELLO
            async with aiohttp.ClientSession() as s, s.post(sim.url + path, json=body) as r:
                out[f"{compat} {path} {request_body} {options} {faults}"] = await r.read()
        finally:
            await sim.close()
    out["two choices"] = b"".join(choices_stream([30, 30], True, "fp_sim"))  # finishing together
    return out


@pytest.fixture(scope="module")
def recorded() -> dict[str, bytes]:
    return asyncio.run(recordings())


def as_relayed(stream: bytes, strip: bool) -> bytes:
    """What the client should get of ``stream``: all of it, but for the usage chunk the gateway asked for on its
    behalf (``strip``), which is taken out, its system_fingerprint put on each terminal chunk."""
    blocks = stream.split(b"\n\n")
    usage = [b for b in blocks if b.startswith(b"data: {") and json.loads(b[6:]).get("choices") == []]
    if not strip or not usage:
        return stream
    fingerprint = json.loads(usage[0][6:]).get("system_fingerprint")
    out = []
    for block in blocks:
        if block is usage[0]:
            continue
        if fingerprint is not None and block.startswith(b"data: {"):
            chunk = json.loads(block[6:])
            if any(c.get("finish_reason") for c in chunk.get("choices", ())) and "system_fingerprint" not in chunk:
                block = (
                    b"data: " + json.dumps({**chunk, "system_fingerprint": fingerprint}, separators=(",", ":")).encode()
                )
        out.append(block)
    return b"\n\n".join(out)


def tokens_in(stream: bytes) -> int:
    """Content events: chunks with a choice that are not the role-only first chunks."""
    count = 0
    for block in stream.split(b"\n\n"):
        if block.startswith(b"data: {"):
            chunk = json.loads(block[6:])
            count += sum("role" not in c.get("delta", {}) for c in chunk.get("choices", ()))
    return count


@given(data=st.data())
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_relayed_events_do_not_depend_on_how_the_engines_bytes_are_split(
    recorded: dict[str, bytes], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(recorded)), label="stream")
    stream = recorded[name]
    strip = data.draw(st.booleans(), label="strip")  # the gateway asked for the usage chunk, or the client did
    size = data.draw(st.integers(1, len(stream)), label="read size")  # reads of one size, as a socket buffer's
    offset = data.draw(st.integers(0, size - 1), label="first read")
    more = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="more cuts")
    cuts = sorted({*range(offset, len(stream), size), *more})
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    ex = Exchange(perf_counter(), "chat_completions", "split", "POST", CHAT, "127.0.0.1")
    itl = HistogramChild((0.001, 1.0))
    events = _Events(itl, strip, ex)
    out = b"".join(events.feed(read) for read in reads) + events.rest()
    assert out == as_relayed(stream, strip)
    tokens = tokens_in(stream)
    assert events.events == tokens
    assert sum(itl.counts) == tokens - 1
    assert (ex.ttft is not None) == (tokens > 0)
    usage = re.search(rb'"completion_tokens":(\d+)', stream)
    assert ex.completion_tokens == (int(usage[1]) if usage else None)


def test_an_event_that_never_ends_is_relayed_not_held_without_bound() -> None:
    """An engine that never writes the blank line ending an event: what the relay holds back stays bounded."""
    ex = Exchange(perf_counter(), "chat_completions", "endless", "POST", CHAT, "127.0.0.1")
    events = _Events(HistogramChild((0.001, 1.0)), True, ex)
    piece = b"data: " + b"x" * (1 << 16)
    out = [events.feed(piece) for _ in range(256)]  # 16 MB without a "\n\n"
    assert len(events.carry) <= 1 << 22
    assert sum(map(len, out)) + len(events.carry) == 256 * len(piece)  # every byte relayed or still carried
    assert events.events == 0


# -- the client connection around a relayed stream ---------------------------------------------------------


async def read_chunked_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One chunked answer off a kept-alive connection: its head and its events."""
    head = await reader.readuntil(b"\r\n\r\n")
    body = bytearray()
    while True:
        size = int(await reader.readuntil(b"\r\n"), 16)
        body += await reader.readexactly(size + 2)
        if size == 0:
            return head, bytes(body[:-2])
        del body[-2:]


async def test_streams_one_after_another_on_a_kept_alive_and_a_pipelined_connection(
    stack: contextlib.AsyncExitStack,
) -> None:
    """After a relayed stream the client's connection carries the next answer cleanly: one request after the
    other's end, and two requests sent at once (pipelined), each answered whole and in order."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    def kept(max_tokens: int) -> bytes:
        return request("1.1", max_tokens).replace(b"Connection: close\r\n", b"")

    writer.write(kept(3000))
    answers = [await read_chunked_answer(reader)]
    writer.write(kept(2000) + kept(1000))
    answers += [await read_chunked_answer(reader), await read_chunked_answer(reader)]
    writer.close()
    for (head, events), tokens in zip(answers, [3000, 2000, 1000], strict=True):
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        assert contents(events) == sim_words(tokens)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 6000
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 3
    assert sim.outcomes() == ["length"] * 3


async def test_a_stream_whose_200_a_heartbeat_sent_is_relayed_whole_once_tokens_flow(
    stack: contextlib.AsyncExitStack,
) -> None:
    """A long prefill: the gateway's heartbeat sends the 200 and its comments; the tokens that follow go out on
    that same answer, thousands of them, framed as its chunks."""
    sim = await sim_in(stack, itl=0.0, ttft=0.5)
    gw = await gateway_in(stack, [sim.url], stream_heartbeat=0.05)
    client = await stream_from(gw, 5000)
    events = await client.read_to_end()
    heartbeats, _, rest = events.partition(b"data: ")
    assert heartbeats.startswith(b": ") and heartbeats.endswith(b"\n\n")  # the gateway's, during the prefill
    assert contents(b"data: " + rest) == sim_words(5000)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 5000
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == 4999
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1


async def test_status_says_which_path_relayed_the_tokens(stack: contextlib.AsyncExitStack, relay_splice: str) -> None:
    """With the C splice, the tokens between the first and the last pass through C (their inter-token gaps
    observed there too); the first event, the terminal chunk, the usage chunk and [DONE] through Python."""
    sim = await sim_in(stack, itl=0.0005)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    tokens = 400
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=tokens, stream=True)
    assert len([chunk async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]) == tokens
    await settled(gw, sim)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/status") as r:
        relay = (await r.json())["relay"]
    assert relay["splice"] == relay_splice
    if relay_splice == "c":
        assert 0 < relay["events_in_c"] < tokens
    else:
        assert relay["events_in_c"] == 0
    text = await gw.metrics()
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == tokens - 1
    assert value(text, "gateway_inter_token_latency_seconds_sum", model=MODEL) > 0


async def test_requests_leave_no_cyclic_garbage_of_the_gateways(stack: contextlib.AsyncExitStack) -> None:
    """What a request made is freed when it ends, by reference counting: the gateway raises the collector's
    thresholds (gateway/app.py) because no collection is needed for it, streamed or not, relayed in C or not."""
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    gc.collect()
    for _ in range(5):
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=300, stream=True)
        assert len([chunk async for chunk in stream]) > 300
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    await settled(gw, sim)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        ours = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("gateway.")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []


async def test_the_served_gateway_relays_the_engines_stream_byte_for_byte(
    stack: contextlib.AsyncExitStack, relay_splice: str
) -> None:
    """``glm-gateway serve`` as a process, on uvloop as deployed (the tests above run the gateway on the test's
    asyncio loop): a long stream reaches the client as the engine sent it, through the C splice or not."""
    sim = await sim_in(stack, itl=0.0)
    port = free_port()
    gw = Process(
        "serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", sim.url, "--relay-splice", relay_splice,
        "--access-log", "off", "--health-interval", "0.1",
    )  # fmt: skip
    stack.callback(gw.stop)
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_http, url + "/health/ready")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "stream": True}
    headers = {"X-Request-Id": "same-stream"}
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + CHAT, json=body, headers=headers) as r:
            direct = await r.read()
        async with s.post(url + CHAT, json=body, headers=headers) as r:
            relayed = await r.read()
        async with s.get(url + "/status") as r:
            relay = (await r.json())["relay"]
    assert created_anytime(relayed) == created_anytime(direct)
    assert relay["splice"] == relay_splice
    assert (relay["events_in_c"] > 0) == (relay_splice == "c")


# -- the hand-over between the C splice and the Python path, at every kind of read boundary ------------------


def split_stream(tokens: int) -> tuple[bytes, list[bytes]]:
    """A chat answer as vLLM sends it, with the usage chunk: the response head and its HTTP chunks, one per event
    (the role chunk, ``tokens`` token chunks, the terminal chunk, the usage chunk, [DONE]) and the last chunk."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": "chatcmpl-split", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
        return b"data: " + json.dumps({**chunk, "choices": choices, **extra}, separators=(",", ":")).encode() + b"\n\n"

    def choice(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    events = [event([choice({"role": "assistant", "content": ""}, None)])]
    events += [event([choice({"content": f"w{i} "}, None)]) for i in range(tokens)]
    events.append(event([choice({"content": ""}, "stop")]))
    events.append(event([], usage={"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}))
    events.append(DONE)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head, [b"%x\r\n%b\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]


def split_plans(head: bytes, chunks: list[bytes], seed: int, count: int) -> list[tuple[str, list[int]]]:
    """Ways to cut the answer into reads (the offsets where one read ends and the next begins): hand-written ones,
    each cutting every chunk at one kind of place (a read boundary exactly where the C splice takes the connection
    or hands it back), then ``count`` drawn with ``random.Random(seed)``."""
    starts = [len(head)]
    for chunk in chunks:
        starts.append(starts[-1] + len(chunk))
    total = starts.pop()
    spots: dict[str, list[int]] = {}  # each kind of place, in every chunk
    for start, chunk in zip(starts, chunks, strict=True):
        digits = chunk.index(b"\r\n")
        payload = len(chunk) - digits - 4
        at = start + digits + 2  # the payload's first byte
        for name, offset in [
            ("a chunk's start", start),
            ("inside the size", start + 1),
            ("between the size and its CR", start + digits),
            ("inside the size line's CRLF", start + digits + 1),
            ("between the size line and the payload", at),
            ("inside the payload", at + payload // 2),
            ("inside the event's blank line", at + payload - 1),
            ("between the payload and its CRLF", at + payload),
            ("inside the payload's CRLF", at + payload + 1),
        ]:
            spots.setdefault(name, []).append(offset)
    plans: list[tuple[str, list[int]]] = [("the whole answer in one read", [])]
    plans += [(f"every chunk cut at {name}", offsets) for name, offsets in spots.items()]
    plans += [(f"every chunk cut at its start and at {name}", spots["a chunk's start"] + offsets)
              for name, offsets in spots.items() if name != "a chunk's start"]  # fmt: skip
    for every in (2, 3, 7):
        plans.append((f"{every} chunks a read", starts[::every]))
        plans.append((f"{every} chunks a read, from inside a payload", spots["inside the payload"][::every]))
    plans.append(("the head cut, then whole chunks", [len(head) // 2, *starts[1:]]))
    plans.append(("the head with the role chunk, then whole chunks", starts[1:]))
    plans.append(("whole chunks and half chunks by turns",
                  [*starts, *spots["inside the payload"][1::2]]))  # fmt: skip
    near = [s + d for s in [*starts[1:5], *starts[-6:]] for d in range(-3, 7)]  # every byte around hand-overs
    plans.append(("every byte around the first and the last chunks' edges", [*near, *starts]))
    plans.append(("every byte of the last five chunks", list(range(starts[-5], total))))
    rng = random.Random(seed)
    edges = sorted({o for offsets in spots.values() for o in offsets})
    for i in range(count):
        anywhere = rng.sample(range(1, total), rng.randint(1, 25))
        at_edges = rng.sample(edges, rng.randint(0, 25))
        size = rng.randint(1, total)  # reads of one size, as a socket buffer's, for some of them
        sized = list(range(rng.randrange(size), total, size)) if i % 3 == 0 else []
        plans.append((f"drawn {i}", [*anywhere, *at_edges, *sized]))
    return [(name, sorted({c for c in cuts if 0 < c < total})) for name, cuts in plans]


async def split_engine(
    stack: contextlib.AsyncExitStack, response: bytes, plans: list[tuple[str, list[int]]]
) -> tuple[str, list[str]]:
    """A raw engine: the health checks' and scrapes' answers (bench/engine.py's), and every streamed chat request
    answered with ``response`` written in the pieces of the next plan, each read by the gateway on its own (mostly:
    the kernel may merge some).  Connections are kept alive.  Returns its URL and the names of the plans used."""
    from bench.engine import HEALTH, METRICS, MODELS, NOT_FOUND

    used: list[str] = []
    pending = list(plans)

    async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.IGNORECASE)
                body = await reader.readexactly(int(length[1]) if length else 0)
                method, path = head.split(b" ", 2)[:2]
                path = path.split(b"?")[0]
                if method == b"POST" and path == CHAT.encode():
                    assert b'"stream":true' in body.replace(b" ", b""), body
                    name, cuts = pending.pop(0)
                    used.append(name)
                    for a, b in zip([0, *cuts], [*cuts, len(response)], strict=True):
                        writer.write(response[a:b])
                        await writer.drain()
                        await asyncio.sleep(0.001)  # the gateway reads the piece before the next comes
                else:
                    writer.write({b"/health": HEALTH, b"/v1/models": MODELS, b"/metrics": METRICS}.get(path, NOT_FOUND))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve_connection, "127.0.0.1", 0)
    stack.push_async_callback(server.wait_closed)
    stack.callback(server.close)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", used


async def test_the_relayed_stream_does_not_depend_on_where_the_engines_reads_hand_over_to_c(
    stack: contextlib.AsyncExitStack, relay_splice: str
) -> None:
    """A real gateway in front of an engine whose chunked answer arrives in pieces cut anywhere: in a chunk's size
    line, between it and the payload, in the payload, before its CRLF, several chunks a read.  Between two chunks
    the connection goes to the C splice, and any read that is not whole token chunks comes back to Python: the
    client gets every event exactly as the engine sent it, and every token is counted once.  The plans are
    hand-written ones, then 40 drawn from a seeded ``random.Random`` (a loop, not hypothesis: one gateway and one
    engine serve them all)."""
    tokens = 40
    head, chunks = split_stream(tokens)
    response = head + b"".join(chunks)
    plans = split_plans(head, chunks, seed=20261202, count=40)
    url, used = await split_engine(stack, response, plans)
    gw = await gateway_in(stack, [url])
    host, port = gw.url.removeprefix("http://").split(":")
    sent = dechunk(b"".join(chunks))
    for name, cuts in plans:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request("1.1", tokens, stream_options={"include_usage": True}))
        answer, _, raw = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), (name, answer)
        assert dechunk(raw) == sent, f"plan {name!r}: reads cut at {cuts} of {response!r}"
    assert used == [name for name, _ in plans]
    await settled(gw)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == len(plans)
    assert value(text, "gateway_request_errors_total") == 0
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == tokens * len(plans)
    # each answer's events less its first: the tokens and the terminal chunk (the role chunk is none)
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == tokens * len(plans)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/status") as r:
        relay = (await r.json())["relay"]
    assert relay["splice"] == relay_splice
    if relay_splice == "c":
        assert relay["events_in_c"] > 0
    else:
        assert relay["events_in_c"] == 0
