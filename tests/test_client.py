"""The request path's engine client against the real simulated engine and against scripted engines on loopback
that misbehave at the HTTP level: stale keep-alives, silence, truncation, garbage, HEAD, large bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from gateway import client as client_module
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


def answering(raw: bytes, then: str = "close", seen: list[bytes] | None = None) -> Script:
    """An engine that reads a request (into ``seen``) and writes ``raw``; ``then`` it closes the
    connection ("close", a FIN), keeps it open until the client closes it ("hold") or resets it ("reset",
    an RST)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if seen is not None:
            seen.append(head)
        writer.write(raw)
        await writer.drain()
        if then == "hold":
            await reader.read()
        elif then == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    return script


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


def closing_after_one_answer(heads: list[int], delay: float = 0.0) -> Script:
    """An engine that answers one request per connection (keep-alive, as HTTP/1.1 is by default), then
    closes the connection when the next request arrives on it, ``delay`` seconds after reading it."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(0)
        await read_request(reader)
        heads[-1] += 1
        writer.write(OK)
        await writer.drain()
        await read_request(reader)
        heads[-1] += 1
        await asyncio.sleep(delay)

    return script


async def test_stale_keepalive_is_retried_on_a_fresh_connection_when_idempotent(engine_client: EngineClient) -> None:
    heads: list[int] = []
    async with scripted(closing_after_one_answer(heads)) as (url, accepted):
        for _ in range(3):
            resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
            assert (resp.status, await resp.read()) == (200, b"ok")
            resp.release()
        await wait_for(lambda: sum(heads) == 5, "the last request head")
    # three answers; the second and third went first to a reused connection that closed, then to a new one
    assert accepted[0] == 3
    assert heads == [2, 2, 1]


async def test_a_post_the_engine_may_have_read_is_never_sent_twice(engine_client: EngineClient) -> None:
    """A generation is not idempotent: a reused connection lost after the POST went out is an error."""
    heads: list[int] = []
    async with scripted(closing_after_one_answer(heads)) as (url, accepted):
        resp = await engine_client.request(url, "POST", CHAT, [], b"{}")
        assert await resp.read() == b"ok"
        resp.release()
        with pytest.raises(EngineBrokeOff):
            await engine_client.request(url, "POST", CHAT, [], b"{}")
    assert accepted[0] == 1
    assert heads == [2]


async def test_reused_connection_lost_late_is_an_error_not_a_resend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost long after the request went out, the engine may have acted on it: never sent twice."""
    monkeypatch.setattr(client_module, "STALE_WINDOW", 0.05)
    heads: list[int] = []
    engine_client = EngineClient(connect_timeout=5, read_timeout=5)
    async with scripted(closing_after_one_answer(heads, delay=0.3)) as (url, accepted):
        resp = await engine_client.request(url, "POST", CHAT, [], b"{}")
        assert await resp.read() == b"ok"
        resp.release()
        with pytest.raises(EngineBrokeOff, match="closed the connection mid-answer"):
            await engine_client.request(url, "POST", CHAT, [], b"{}")
    assert accepted[0] == 1
    assert heads == [2]
    engine_client.close()


async def test_refused_connection_is_unreachable(engine_client: EngineClient) -> None:
    with pytest.raises(EngineUnreachable, match="cannot connect: connect call failed"):
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


async def test_answer_cut_short_raises_after_what_arrived(engine_client: EngineClient) -> None:
    async with scripted(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")) as (url, _):
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        assert resp.content_length == 100
        assert await resp.read_chunk() == b"0123456789"
        with pytest.raises(EngineBrokeOff, match="mid-answer"):
            await resp.read_chunk()
        resp.release()
        assert not engine_client.origin(url).idle


async def test_garbage_is_not_http(engine_client: EngineClient) -> None:
    async with scripted(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", then="hold")) as (url, _):
        with pytest.raises(EngineBrokeOff, match="not valid HTTP"):
            await engine_client.request(url, "GET", "/v1/models", [], b"")


async def test_head_answer_has_no_body_and_is_not_reused(engine_client: EngineClient) -> None:
    seen: list[bytes] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\n"
    async with scripted(answering(head, "hold", seen)) as (url, _):
        resp = await engine_client.request(url, "HEAD", "/v1/models", [], b"")
        assert (resp.status, resp.content_length, resp.content_type) == (200, 5, "application/json")
        assert await resp.read() == b""
        resp.release()
        assert not engine_client.origin(url).idle
    assert seen[0].startswith(b"HEAD /v1/models HTTP/1.1\r\n")


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
        assert resp.transport is not None
        got = bytearray(await resp.read_chunk())
        # the client stops reading from the engine once it holds 256 KiB nobody took
        await wait_for(lambda: resp.transport is not None and not resp.transport.is_reading(), "reading to pause")
        while chunk := await resp.read_chunk():
            got += chunk
        assert got == b"".join(pieces)
        resp.release()
        assert len(engine_client.origin(url).idle) == 1


async def test_body_ending_with_the_connection(engine_client: EngineClient) -> None:
    async with scripted(answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")) as (url, _):
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        assert await resp.read() == b"all of it"
        resp.release()
        assert not engine_client.origin(url).idle


async def test_request_head_as_written(engine_client: EngineClient) -> None:
    seen: list[bytes] = []
    async with scripted(answering(OK, seen=seen)) as (url, _):
        resp = await engine_client.request(url + "/engine", "POST", "/v1/x?a=1", [("X-A", "b"), ("X-T", "中文")], b"{}")
        await resp.read()
        resp.release()
        assert url.startswith("http://")
        creds = "http://u%40x:p@" + url[7:]  # credentials in the engine URL replace the client's
        resp = await engine_client.request(creds, "GET", "/v1/models", [("Authorization", "Bearer client")], b"")
        await resp.read()
        resp.release()
    host = url[7:].encode()
    assert seen == [
        b"POST /engine/v1/x?a=1 HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\r\nX-T: \xe4\xb8\xad\xe6\x96\x87\r\n"
        b"Content-Length: 2\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: Basic dUB4OnA=\r\n\r\n",
    ]


async def test_interim_answers_are_skipped(engine_client: EngineClient) -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
            await writer.drain()

    async with scripted(early_hints) as (url, accepted):
        for _ in range(2):
            resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
            assert (resp.status, resp.reason, await resp.read()) == (200, "OK", b"ok")
            assert "Link" not in resp.headers
            resp.release()
    assert accepted[0] == 1


async def test_large_request_body_is_sent_whole_to_a_slow_reader(engine_client: EngineClient) -> None:
    body = bytes(range(256)) * 16384  # 4 MiB, more than the socket and transport buffers hold
    received: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        data = bytearray()
        while len(data) < len(body):
            data += await reader.read(65536)
            await asyncio.sleep(0)
        received.append(bytes(data))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with scripted(slow) as (url, _):
        resp = await engine_client.request(url, "POST", CHAT, [], body)
        assert await resp.read() == b"ok"
        resp.release()
    assert received == [body]


async def test_engine_answering_before_reading_the_body(engine_client: EngineClient) -> None:
    """An engine may refuse a request from its head alone (413) and never read the body."""
    body = b"x" * (16 << 20)

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await asyncio.sleep(30)  # keeps the connection open, reads nothing more

    async with scripted(refuse) as (url, _):
        resp = await engine_client.request(url, "POST", CHAT, [], body)
        assert (resp.status, await resp.read()) == (413, b"big")
        resp.release()  # half a body went out: the connection is not reusable
        assert not engine_client.origin(url).idle


async def test_reset_during_a_body_without_length(engine_client: EngineClient) -> None:
    # RST, not FIN: the body did not end
    async with scripted(answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart", then="reset")) as (url, _):
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        with pytest.raises(EngineBrokeOff):
            await resp.read()
        resp.release()


async def test_gateway_keeps_one_engine_connection_for_sequential_requests(sim: Sim) -> None:
    """No connection leaks: back-to-back requests share one kept-alive engine connection, and closing the
    gateway closes it."""
    gw: Gw = await start_gateway([sim.url])
    try:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            for stream in (False, True, False, True):
                # a header value beyond Latin-1 goes through as the client's bytes
                async with session.post(gw.url + CHAT, json=body | {"stream": stream}, headers={"X-T": "中文"}) as r:
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


async def test_connections_idle_past_the_keepalive_are_closed(
    engine_client: EngineClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a request to notice: an engine behind a load balancer may keep them open for good."""
    monkeypatch.setattr(client_module, "KEEPALIVE_TIMEOUT", 0.05)
    closed: list[int] = []

    async def keepalive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(OK)
                await writer.drain()
        except asyncio.IncompleteReadError:
            closed.append(1)  # the client closed the connection

    async with scripted(keepalive) as (url, accepted):
        idle = engine_client.origin(url).idle
        first, second = await asyncio.gather(
            *(engine_client.request(url, "GET", "/v1/models", [], b"") for _ in range(2))
        )
        for resp in (first, second):
            assert await resp.read() == b"ok"
        first.release()
        await wait_for(lambda: closed == [1], "the idle connection to be closed once expired")
        assert not idle
        second.release()
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        assert resp is second  # one that has not expired is reused
        await resp.read()
        resp.release()
        assert list(idle) == [second]
        await wait_for(lambda: closed == [1, 1], "the second one to be closed once expired")
        assert not idle
        resp = await engine_client.request(url, "GET", "/v1/models", [], b"")
        await resp.read()
        resp.release()
    assert accepted[0] == 3
