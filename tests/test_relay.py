"""The SSE relay once tokens flow: a client that reads slower than the engine writes, and an HTTP/1.0 client
(no chunked encoding), each gets the whole stream, in order, with nothing held in the gateway for good."""

from __future__ import annotations

import asyncio
import contextlib
import json

from tests.harness import CHAT, HELLO, MODEL, Gw, gateway_in, settled, sim_in, value, wait_for

TOKENS = 20_000  # about 4 MB of events: far more than the sockets' buffers between the gateway and the client


def request(version: str, max_tokens: int) -> bytes:
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, "stream": True}).encode()
    head = f"POST {CHAT} HTTP/{version}\r\nHost: gw\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


def engine_reading_paused(gw: Gw) -> bool:
    """An engine connection of the gateway's with reading paused: the client's backpressure reached the engine."""
    return any(conn._paused for origin in gw.gateway.proxy.client._origins.values() for conn in origin.open)


def dechunk(raw: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            return bytes(out)
        out += raw[end + 2 : end + 2 + size]
        assert raw[end + 2 + size : end + 4 + size] == b"\r\n"
        at = end + 4 + size


def contents(events: bytes) -> list[str]:
    """The content of each token event, in order; [DONE] last."""
    blocks = events.split(b"\n\n")
    assert blocks[-2:] == [b"data: [DONE]", b""], blocks[-3:]
    out = []
    for block in blocks[:-2]:
        chunk = json.loads(block.removeprefix(b"data: "))
        assert "usage" not in chunk or chunk["choices"], "the usage chunk the gateway asked for is taken out"
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            out.append(delta["content"])
    return out


async def test_a_slow_reader_pauses_the_engine_and_gets_every_event(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, itl=0.0)
    gw = await gateway_in(stack, [sim.url])
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 14)
    writer.write(request("1.1", TOKENS))
    # nothing read: the client's buffers fill, the gateway's transport pauses writing, and the gateway stops
    # reading from the engine instead of buffering the stream in memory
    await wait_for(lambda: engine_reading_paused(gw), "the gateway to pause reading from the engine")
    raw = await reader.read()  # now read it all: reading from the engine resumes
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    tokens = contents(dechunk(body))
    assert len(tokens) == TOKENS
    assert tokens[:3] == ["the ", "gateway ", "relays "]
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
