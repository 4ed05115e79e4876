"""Hostile clients on raw sockets: slow heads and bodies, idle and excess connections, odd request lines,
100-continue, hop-by-hop tricks and request smuggling, against the real gateway and the real sim."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
    Process,
    error_body,
    free_port,
    gateway_in,
    settled,
    sim_in,
    start_sim_at,
    value,
    wait_for,
    wait_http,
)

CHAT_BODY = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2}).encode()


async def connect(gw: Gw) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length: status line, headers (lower-case names), body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status, *lines = head.split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Wait for the gateway to close the connection (the guard only stops a hung test)."""
    async with asyncio.timeout(20):
        await reader.read()  # whatever is left of the answer, then EOF
    return reader.at_eof()


async def closes(gw: Gw, reason: str) -> float:
    return value(await gw.metrics(), "gateway_client_connections_closed_total", reason=reason)


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"])
async def test_a_head_that_does_not_arrive_in_time_gets_408_and_the_connection_closed(sent: bytes) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url], client_header_timeout=0.2)
        reader, writer = await connect(gw)
        writer.write(sent)
        status, headers, body = await read_answer(reader)
        assert status == "HTTP/1.1 408 Request Timeout"
        assert headers["connection"] == "close"
        error_body(json.loads(body), code="client_timeout", type="invalid_request_error")
        assert await closed(reader)
        writer.close()
        assert await closes(gw, "header_timeout") == 1
        assert sim.journal == []
        await settled(gw, sim)


async def test_the_head_timeout_restarts_with_each_request_on_a_kept_alive_connection() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url], client_header_timeout=0.5)
        reader, writer = await connect(gw)
        for _ in range(3):  # each within its own timeout, not all of them within one
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_answer(reader)
            assert status == "HTTP/1.1 200 OK"
            await asyncio.sleep(0.3)
        writer.close()
        assert await closes(gw, "header_timeout") == 0


async def test_a_body_that_stops_arriving_gets_408_client_timeout() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url], client_body_timeout=0.2)
        reader, writer = await connect(gw)
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        writer.write(head.encode() + CHAT_BODY[:10])
        status, headers, body = await read_answer(reader)
        assert status.startswith("HTTP/1.1 408")
        assert headers["connection"] == "close"
        error_body(json.loads(body), code="client_timeout", type="invalid_request_error")
        assert await closed(reader)
        writer.close()
        metrics = await gw.metrics()
        assert value(metrics, "gateway_client_connections_closed_total", reason="body_timeout") == 1
        assert value(metrics, "gateway_request_errors_total", error_type="client_timeout") == 1
        assert value(metrics, "gateway_requests_total", status="408") == 1
        assert sim.journal == []
        await settled(gw, sim)


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url], keepalive_timeout=0.2)
        reader, writer = await connect(gw)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_answer(reader)
        assert status == "HTTP/1.1 200 OK" and headers.get("connection") != "close"
        assert await closed(reader)
        writer.close()
        await wait_for(lambda: open_connections(gw) == 0, "no connection open")


async def test_a_connection_over_max_connections_gets_503_and_is_closed() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url], max_connections=2)
        held = [await connect(gw) for _ in range(2)]
        await wait_for(lambda: open_connections(gw) == 2, "two connections open")
        reader, writer = await connect(gw)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert headers["connection"] == "close" and headers["retry-after"] == "1"
        error_body(json.loads(body), code="too_many_connections", type="server_error")
        assert await closed(reader)
        writer.close()
        held.pop()[1].close()
        await wait_for(lambda: open_connections(gw) == 1, "one connection left")
        assert await closes(gw, "max_connections") == 1
        await wait_for(lambda: open_connections(gw) == 1, "the scrape's connection closed")
        reader, writer = await connect(gw)  # room again
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(reader))[0] == "HTTP/1.1 200 OK"
        writer.close()
        for _, w in held:
            w.close()


def open_connections(gw: Gw) -> int:
    """The gateway's count of open client connections (what gateway_client_connections shows)."""
    return gw.runner.listener.open  # type: ignore[attr-defined, no-any-return]


async def test_expect_100_continue_over_the_body_limit_gets_413_at_once_and_under_it_100_continue() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url], max_body_bytes=1000)
        reader, writer = await connect(gw)
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n".encode()
        )
        status, _, body = await read_answer(reader)
        assert status == "HTTP/1.1 413 Request Entity Too Large"  # and no 100 Continue before it
        error_body(json.loads(body), code="body_too_large", type="invalid_request_error")
        writer.close()

        reader, writer = await connect(gw)
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(CHAT_BODY)}\r\n"
        writer.write(head.encode() + b"Content-Type: application/json\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(CHAT_BODY)
        assert (await read_answer(reader))[0] == "HTTP/1.1 200 OK"
        writer.close()
        metrics = await gw.metrics()
        assert value(metrics, "gateway_request_errors_total", error_type="body_too_large") == 1
        assert len(sim.journal) == 1
        await settled(gw, sim)


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET /health/live HTTP/2.0\r\nHost: x\r\n\r\n", "HTTP/1.1 505 HTTP Version Not Supported"),
        (b"GET /health/live\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /health/live HTTP/0.9\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ],
)
async def test_http2_and_version_less_request_lines_are_refused_in_http11(line: bytes, status: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url])
        reader, writer = await connect(gw)
        writer.write(line)
        got, headers, body = await read_answer(reader)
        assert got == status
        assert headers["connection"] == "close"
        error_body(json.loads(body), code="invalid_request", type="invalid_request_error")
        assert await closed(reader)
        writer.close()
        assert await closes(gw, "bad_version") == 1


async def test_a_header_named_in_a_second_connection_header_does_not_reach_the_engine() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url])
        reader, writer = await connect(gw)
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
            f"Connection: X-Secret\r\nX-Secret: hop\r\nContent-Length: {len(CHAT_BODY)}\r\n\r\n"
        )
        writer.write(head.encode() + CHAT_BODY)
        assert (await read_answer(reader))[0] == "HTTP/1.1 200 OK"
        writer.close()
        (entry,) = (await sim.state())["requests"]
        assert "x-secret" not in {name.lower() for name in entry["headers"]}
        await settled(gw, sim)


# Request-smuggling forms aiohttp's parser refuses with a 400: kept under test so they keep being refused.
_H = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
SMUGGLING = {
    "cl_and_te": _H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": _H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": _H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_twice": _H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "te_chunked_then_identity": _H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te_trailing_comma": _H + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
    "te_obs_fold": _H + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n",
    "cl_twice_differing": _H + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "cl_twice_equal": _H + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    "cl_list": _H + b"Content-Length: 4, 5\r\n\r\nabcde",
    "cl_plus_sign": _H + b"Content-Length: +4\r\n\r\nabcd",
    "cl_negative": _H + b"Content-Length: -1\r\n\r\n",
    "cl_hex": _H + b"Content-Length: 0x4\r\n\r\nabcd",
    "cl_space_before_colon": _H + b"Content-Length : 4\r\n\r\nabcd",
    "chunk_size_nul": _H + b"Transfer-Encoding: chunked\r\n\r\n4;\x00\r\nabcd\r\n0\r\n\r\n",
    "chunk_size_0x": _H + b"Transfer-Encoding: chunked\r\n\r\n0x4\r\nabcd\r\n0\r\n\r\n",
    "chunk_bare_lf": _H + b"Transfer-Encoding: chunked\r\n\r\n4\nabcd\n0\n\n",
    "head_bare_lf": b"POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
    "head_bare_cr": b"POST /v1/chat/completions HTTP/1.1\rHost: x\r\nContent-Length: 0\r\n\r\n",
    "nul_in_header": _H + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "space_before_colon": _H + b"X-A : b\r\nContent-Length: 0\r\n\r\n",
    "two_hosts": _H + b"Host: y\r\nContent-Length: 0\r\n\r\n",
    "nul_in_method": b"P\x00ST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "header_without_colon": _H + b"Junk\r\nContent-Length: 0\r\n\r\n",
}


async def test_request_smuggling_forms_are_refused_and_reach_no_engine() -> None:
    async with contextlib.AsyncExitStack() as stack:
        sim = await sim_in(stack)
        gw = await gateway_in(stack, [sim.url])
        for name, raw in SMUGGLING.items():
            reader, writer = await connect(gw)
            writer.write(raw)
            status, _, body = await read_answer(reader)
            assert status.split()[1] == "400", (name, status)
            error_body(json.loads(body), code="invalid_request", type="invalid_request_error")
            assert await closed(reader), name
            writer.close()
        assert await closes(gw, "malformed") == len(SMUGGLING)
        assert sim.journal == []
        await settled(gw, sim)


# -- as a process: the listening socket, the open-files limit, the drain ----------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_line_and_exit_1(workers: str) -> None:
    """One process opens its port through aiohttp's site, the parent of --workers with a socket of its own:
    the same line either way."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = Process(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--upstream",
            "http://127.0.0.1:9",
            "--workers",
            workers,
        )
        try:
            assert gw.wait() == 1
            lines = gw.output().strip().splitlines()
            assert lines[-1] == f"glm-gateway: cannot listen on 127.0.0.1:{port}: address already in use"
            assert "Traceback" not in "\n".join(lines)
        finally:
            gw.stop()


async def _serve(port: int, upstream: str, *flags: str) -> Process:
    """A gateway process in front of an engine of this test's event loop: waited for in a thread."""
    gw = Process("serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", upstream, *flags)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health/ready")
    except BaseException:
        gw.stop()
        raise
    return gw


async def _raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_the_drain_answers_a_trickled_body_503_at_once_instead_of_waiting_for_it() -> None:
    sim = await start_sim_at(free_port())
    port = free_port()
    gw = await _serve(port, sim.url, "--drain-timeout", "120", "--health-interval", "0.1")
    try:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        reader, writer = await _raw(port, head.encode() + b"{")
        await asyncio.sleep(0.2)  # the head is in and the body is being read: then the signal
        gw.signal(signal.SIGTERM)
        status, _, body = await read_answer(reader)
        assert status.startswith("HTTP/1.1 503")
        error_body(json.loads(body), code="draining", type="server_error")
        writer.close()
        assert await asyncio.to_thread(gw.wait, 30) == 0  # long before the 120 s drain timeout
        assert "drained" in gw.output()
    finally:
        gw.stop()
        await sim.close()


async def test_streams_still_running_at_the_drain_deadline_end_with_an_error_event_and_done() -> None:
    sim = await start_sim_at(free_port(), itl=0.05, output_tokens=100000)
    port = free_port()
    gw = await _serve(port, sim.url, "--drain-timeout", "0.5", "--health-interval", "0.1")
    try:
        body = json.dumps({"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 100000}).encode()
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        reader, writer = await _raw(port, head.encode() + b"\r\n" + body)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"\n\n")  # a first chunk: the stream runs
        gw.signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = await reader.read()
        writer.close()
        at = rest.rindex(b'data: {"error"')
        error, _, after = rest[at + len(b"data: ") :].partition(b"\n\n")
        assert set(json.loads(error)) == {"error"} and json.loads(error)["error"]["message"]
        assert json.loads(error)["error"]["code"] == "draining"  # the gateway's cut, not an engine failure
        assert after.startswith(b"data: [DONE]\n\n")  # written together with the error event, in one chunk
        assert await asyncio.to_thread(gw.wait, 30) == 0
    finally:
        gw.stop()
        await sim.close()


def test_the_process_raises_its_open_files_limit_and_says_so() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    port = free_port()
    gw = Process("serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", "http://127.0.0.1:9")
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live")
        gw.signal(signal.SIGTERM)
        assert gw.wait() == 0
        assert f"open files limit {hard} (hard {hard})" in gw.output()
    finally:
        gw.stop()


def _with_open_files(limit: int, args: list[str]) -> subprocess.Popen[bytes]:
    """``glm-gateway ARGS`` whose hard open-files limit is ``limit``: it cannot raise it."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )


async def test_running_out_of_file_descriptors_is_a_503_and_never_marks_the_engine_down() -> None:
    sim = await start_sim_at(free_port())
    port, limit = free_port(), 64
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", sim.url, "--health-interval", "30"]
    gw = _with_open_files(limit, [*args, "--max-connections", "1000"])
    extra: list[asyncio.StreamWriter] = []
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health/ready")
        reader, writer = await _raw(port, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # kept for later
        assert (await read_answer(reader))[0] == "HTTP/1.1 200 OK"
        fds = f"/proc/{gw.pid}/fd"
        while len(os.listdir(fds)) < limit:  # idle connections until the gateway has no descriptor left
            extra.append((await asyncio.open_connection("127.0.0.1", port))[1])
            await asyncio.sleep(0.01)
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(CHAT_BODY)}"
        writer.write(head.encode() + b"\r\n\r\n" + CHAT_BODY)
        status, headers, body = await read_answer(reader)
        assert status.startswith("HTTP/1.1 503"), (status, body)
        assert headers["retry-after"] == "1"
        error_body(json.loads(body), code="gateway_overloaded", type="server_error")
        for w in extra:
            w.close()
        await wait_for(lambda: len(os.listdir(fds)) < limit - 8, "the idle connections closed")
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert all(u["up"] for u in json.loads(body)["upstreams"]), body  # the engine was never marked down
        writer.write(head.encode() + b"\r\n\r\n" + CHAT_BODY)
        assert (await read_answer(reader))[0] == "HTTP/1.1 200 OK"
        writer.close()
    finally:
        for w in extra:
            w.close()
        gw.kill()
        gw.wait(10)
        await sim.close()
