"""The request path's engine client against the real simulated engine and against scripted engines on loopback
that misbehave at the HTTP level: stale keep-alives, silence, truncation, garbage, HEAD, large bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from gateway.client import EngineBrokeOff, EngineClient, EngineTimeout, EngineUnreachable
from tests.harness import CHAT, HELLO, MODEL, Gw, Sim, free_port, start_gateway, wait_for

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """An engine that answers every connection with ``script``; yields its URL and a connection counter."""
    accepted = [0]

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


@pytest.fixture
async def engine_client() -> AsyncIterator[EngineClient]:
    c = EngineClient(connect_timeout=5, read_timeout=5)
    yield c
    c.close()


async def test_keepalive_connection_is_reused(engine_client: EngineClient, sim: Sim) -> None:
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 3}).encode()
    conns = []
    for _ in range(3):
        resp = await engine_client.request(sim.url, "POST", CHAT, [("Content-Type", "application/json")], body)
        assert resp.status == 200
        assert json.loads(await resp.read())["usage"]["completion_tokens"] == 3
        resp.release()
        conns.append(resp)
    assert conns[0] is conns[1] is conns[2]
    assert len(sim.runner.server.connections) == 1
    engine_client.close()
    await wait_for(lambda: not sim.runner.server.connections, "the engine to see the connection closed")


async def test_stale_keepalive_is_retried_on_a_fresh_connection(engine_client: EngineClient) -> None:
    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive, as HTTP/1.1 is by default ...
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # ... but the next request on it meets a closing engine

    async with scripted(one_answer_per_connection) as (url, accepted):
        for _ in range(3):
            resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
            assert (resp.status, await resp.read()) == (200, b"ok")
            resp.release()
        assert accepted[0] == 3


async def test_refused_connection_is_unreachable(engine_client: EngineClient) -> None:
    with pytest.raises(EngineUnreachable, match="ConnectionRefusedError"):
        await engine_client.request(f"http://127.0.0.1:{free_port()}", "GET", "/v1/models", [], b"")


async def test_silent_engine_times_out_and_the_connection_is_closed() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up and closes
        closed.set()

    client = EngineClient(connect_timeout=5, read_timeout=0.2)
    async with scripted(silent) as (url, _):
        with pytest.raises(EngineTimeout, match=r"silent for 0\.2 s"):
            await client.request(url, "GET", "/v1/models", [], b"")
        await asyncio.wait_for(closed.wait(), 10)
    assert not client.origin(url).idle


async def test_answer_cut_short_raises_after_what_arrived(engine_client: EngineClient) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    async with scripted(truncated) as (url, _):
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        assert resp.content_length == 100
        assert await resp.read_chunk() == b"0123456789"
        with pytest.raises(EngineBrokeOff, match="mid-answer"):
            await resp.read_chunk()
        resp.release()
        assert not engine_client.origin(url).idle


async def test_garbage_is_not_http(engine_client: EngineClient) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await reader.read()

    async with scripted(garbage) as (url, _):
        with pytest.raises(EngineBrokeOff, match="not valid HTTP"):
            await engine_client.request(url, "GET", "/v1/models", [], b"")


async def test_head_answer_has_no_body_and_is_not_reused(engine_client: EngineClient) -> None:
    async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await read_request(reader)).startswith(b"HEAD /v1/models HTTP/1.1\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\n")
        await reader.read()

    async with scripted(head) as (url, _):
        resp = await engine_client.request(url, "HEAD", "/v1/models", [], b"")
        assert (resp.status, resp.content_length, resp.content_type) == (200, 5, "application/json")
        assert await resp.read() == b""
        resp.release()
        assert not engine_client.origin(url).idle


async def test_large_chunked_body_to_a_slow_reader(engine_client: EngineClient) -> None:
    """More than the client buffers before it stops reading from the engine: every byte, in order."""
    pieces = [bytes([i % 251]) * 65536 for i in range(64)]  # 4 MiB

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(chunked) as (url, _):
        resp = await engine_client.request(url, "GET", "/big", [], b"")
        got = bytearray()
        while chunk := await resp.read_chunk():
            got += chunk
            await asyncio.sleep(0.001)
        assert got == b"".join(pieces)
        resp.release()
        assert len(engine_client.origin(url).idle) == 1


async def test_body_ending_with_the_connection(engine_client: EngineClient) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with scripted(until_close) as (url, _):
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        assert await resp.read() == b"all of it"
        resp.release()
        assert not engine_client.origin(url).idle


async def test_request_head_as_written(engine_client: EngineClient) -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()

    async with scripted(record) as (url, _):
        resp = await engine_client.request(url + "/engine", "POST", "/v1/x?a=1", [("X-A", "b")], b"{}")
        await resp.read()
    assert seen == [b"POST /engine/v1/x?a=1 HTTP/1.1\r\nHost: " + url[7:].encode() + b"\r\nX-A: b\r\n"
                    b"Content-Length: 2\r\n\r\n"]  # fmt: skip


async def test_gateway_keeps_one_engine_connection_for_sequential_requests(sim: Sim) -> None:
    """No connection leaks: back-to-back requests share one kept-alive engine connection, and closing the
    gateway closes it."""
    gw: Gw = await start_gateway([sim.url])
    try:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            for stream in (False, True, False, True):
                async with session.post(gw.url + CHAT, json=body | {"stream": stream}) as r:
                    assert r.status == 200
                    await r.read()
        await wait_for(lambda: not gw.gateway.proxy.active, "the handlers to finish")
        assert len(gw.gateway.proxy.client.origin(sim.url).idle) == 1
        gw.assert_idle()
    finally:
        await gw.close()
    assert not gw.gateway.proxy.client.origin(sim.url).idle
    # the health checks' own client closed too: the engine sees no connection left
    await wait_for(lambda: not sim.runner.server.connections, "the engine to see every connection closed")
