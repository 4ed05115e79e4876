"""Long requests, seen through: the streaming contract (heartbeats while queued and in prefill, every later
failure an error event and [DONE]) with the real openai SDKs and a real nginx, and the long-context metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import openai
import pytest

from gateway.sim.engine import WORDS
from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
    Sim,
    error_body,
    free_port,
    gateway_in,
    post,
    settled,
    sim_in,
    value,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

BEAT = 0.05  # the gateway's heartbeat in these tests: far below every engine delay they set up
NODE_DIR = Path(__file__).parent / "node"
NGINX = "/usr/sbin/nginx"
COMPLETIONS = "/v1/completions"
CONTENT = "".join(WORDS[i % len(WORDS)] + " " for i in range(16))  # the sim's 16 tokens
QUEUED = re.compile(rb"^: queued position=\d+ eta=\d+s$")
PREFILL = re.compile(rb"^: prefill elapsed=\d+s$")


# -- the two SDKs, each streaming one chat completion and showing the bytes it got ------------------------


@dataclass
class Outcome:
    content: str
    error: str | None  # the message of the exception the SDK raised


class _Recorded(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, raw: bytearray) -> None:
        self.stream = stream
        self.raw = raw

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.raw += chunk
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Wire(httpx.AsyncBaseTransport):
    """httpx's own transport, with each answer's bytes recorded as the SDK reads them."""

    def __init__(self, raw: bytearray) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.raw = raw

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Recorded(response.stream, self.raw),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


async def python_sdk(gw: Gw, raw: bytearray) -> Outcome:
    """The openai Python SDK, its bytes recorded by the transport under it."""
    http = httpx.AsyncClient(transport=_Wire(raw), timeout=60.0)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, http_client=http)
    content = ""
    try:
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
    except openai.APIError as exc:
        return Outcome(content, exc.message)
    finally:
        await client.close()
    return Outcome(content, None)


async def node_sdk(gw: Gw, raw: bytearray) -> Outcome:
    """The openai Node SDK: tests/node/stream.mjs prints one JSON line per chunk of bytes, per delta, and
    the result (exit 0 done, 1 an APIError)."""
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), "run `npm ci` in tests/node (bash .ci/run does)"
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "stream.mjs"), gw.url + "/v1", MODEL, HELLO[0]["content"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    result: dict[str, Any] = {}
    content = ""
    try:
        async for line in proc.stdout:
            seen = json.loads(line)
            if "raw" in seen:
                raw += seen["raw"].encode()
            elif "delta" in seen:
                content += seen["delta"]
            else:
                result = seen
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode(errors="replace")
    if result.get("result") == "done":
        assert code == 0, stderr
        assert result["content"] == content
        return Outcome(content, None)
    assert result.get("result") == "error" and result["name"] == "APIError", (result, stderr)
    assert code == 1, stderr
    return Outcome(content, result["message"])


SDKS = {"python": python_sdk, "node": node_sdk}


class Stream:
    """One streamed chat completion by a real SDK, running; ``raw`` grows with the bytes as they arrive."""

    def __init__(self, sdk: str, gw: Gw) -> None:
        self.raw = bytearray()
        self.task = asyncio.create_task(SDKS[sdk](gw, self.raw))

    async def outcome(self) -> Outcome:
        return await self.task


def lines(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\n") if line]


def streamed_content(raw: bytes) -> str:
    """The text of a chat stream's content events."""
    events = (json.loads(x[6:]) for x in lines(raw) if x.startswith(b"data: {"))
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


async def hold_the_slot(gw: Gw, sim: Sim, path: str = CHAT, body: dict[str, Any] | None = None) -> asyncio.Task[Any]:
    """A request that takes the gateway's only slot and stays in the engine until cancelled (the client leaves)."""
    await sim.faults(hang=True)
    holder = asyncio.create_task(post(gw.url + path, json_body=body or {"model": MODEL, "messages": HELLO}))
    await wait_for(lambda: sim.journal, "the holder to reach the engine")
    await sim.faults(hang=False)
    return holder


async def leave(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def error_event(raw: bytes) -> dict[str, Any]:
    """The stream ends with vLLM's error event and [DONE], after heartbeats; returns the error."""
    assert raw.endswith(b"\n\ndata: [DONE]\n\n"), raw[-300:]
    last = lines(raw)[-2]
    assert last.startswith(b'data: {"error"'), raw[-300:]
    return error_body(json.loads(last[len(b"data: ") :]), code=json.loads(last[6:])["error"]["code"])


# -- the contract, with both SDKs ------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
async def test_queued_then_slow_prefill_streams_with_heartbeats(stack: contextlib.AsyncExitStack, sdk: str) -> None:
    """Queued behind another request, then a long prefill: `: queued ...` comments, then `: prefill ...`,
    then the tokens; the SDK yields the content as if nothing had been sent before it."""
    sim = await sim_in(stack, ttft=1.0)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, stream_heartbeat=BEAT)
    holder = await hold_the_slot(gw, sim)
    stream = Stream(sdk, gw)
    await wait_for(lambda: b": queued position=1 " in stream.raw, "a queued heartbeat")
    await leave(holder)
    outcome = await stream.outcome()
    assert outcome == Outcome(CONTENT, None)

    seen = lines(stream.raw)
    kinds = ["queued" if QUEUED.match(x) else "prefill" if PREFILL.match(x) else "data" for x in seen]
    assert all(x.startswith(b"data: ") for x, kind in zip(seen, kinds, strict=True) if kind == "data"), seen
    assert "queued" in kinds and "prefill" in kinds, seen
    order = {"queued": 0, "prefill": 1, "data": 2}
    assert kinds == sorted(kinds, key=order.__getitem__), seen  # never a comment once tokens flow
    assert seen[-1] == b"data: [DONE]"

    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint="chat_completions", status="200") == 1
    assert value(text, "gateway_client_disconnects_total", phase="prefill") == 1  # the holder
    assert value(text, "gateway_time_to_first_token_seconds_count", prompt_band="8k") == 1
    await settled(gw, sim)


FAILURES = ["queue_timeout", "engine_500", "engine_reset"]


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("sdk", SDKS)
async def test_failure_after_a_heartbeat_is_an_error_event_the_sdk_raises(
    stack: contextlib.AsyncExitStack, sdk: str, failure: str
) -> None:
    """Once a heartbeat has sent the 200, a failure (the gateway's queue timeout, an engine's 500, an engine
    reset mid-prefill) ends the stream with an error event and [DONE]; each SDK raises with its message."""
    sim = await sim_in(stack, ttft=5.0 if failure == "engine_reset" else 0.005)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, queue_timeout=0.5, stream_heartbeat=BEAT)
    holder = None
    if failure == "queue_timeout":
        holder = await hold_the_slot(gw, sim)
    elif failure == "engine_500":
        await sim.faults(latency=0.5, error_rate=1.0, error_status=500)
    stream = Stream(sdk, gw)
    if failure == "engine_reset":
        await wait_for(lambda: b": prefill elapsed=" in stream.raw, "a prefill heartbeat")
        await sim.faults(refuse_seconds=0.2)  # the engine drops its open connections: a reset mid-prefill
    outcome = await stream.outcome()
    if holder is not None:
        await leave(holder)

    error = error_event(bytes(stream.raw))
    assert outcome == Outcome("", error["message"])
    beats = QUEUED if failure == "queue_timeout" else PREFILL
    comments = lines(stream.raw)[:-2]
    assert comments and all(beats.match(x) for x in comments), comments
    expected = {
        "queue_timeout": ("queue_timeout", "No capacity freed up within 0.5 s. Retry later."),
        "engine_500": (500, "simulated engine failure"),
        "engine_reset": ("upstream_error", None),
    }[failure]
    assert error["code"] == expected[0]
    if expected[1] is not None:
        assert error["message"] == expected[1]
    else:
        assert error["message"].startswith("The engine broke off the stream"), error

    text = await gw.metrics()
    error_type = "queue_timeout" if failure == "queue_timeout" else "upstream_error"
    assert value(text, "gateway_request_errors_total", endpoint="chat_completions", error_type=error_type) == 1
    if failure == "engine_reset":
        await wait_for_http(sim.url + "/health")  # the engine listens again before the test ends
    await settled(gw, sim)


async def read_stream(url: str, raw: bytearray) -> None:
    """POST a chat stream to the gateway at ``url``, appending its bytes to ``raw`` as they arrive."""
    body = {"model": MODEL, "messages": HELLO, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body) as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            raw += chunk


async def test_queued_position_moves_up_as_requests_ahead_are_admitted(stack: contextlib.AsyncExitStack) -> None:
    """The second of two waiters hears `position=2`; when the first gets the slot, `position=1`."""
    sim = await sim_in(stack, ttft=1.0)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, stream_heartbeat=BEAT)
    holder = await hold_the_slot(gw, sim)
    first, second = bytearray(), bytearray()
    streams = [asyncio.create_task(read_stream(gw.url, first))]
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the first waiter to queue")
    streams.append(asyncio.create_task(read_stream(gw.url, second)))
    await wait_for(lambda: b": queued position=2 " in second, "the second waiter's heartbeat")
    assert b": queued position=1 " in first
    await leave(holder)
    await wait_for(lambda: b": prefill elapsed=" in first, "the first waiter to be forwarded")
    await wait_for(lambda: b": queued position=1 " in second, "the second waiter to move up")
    await asyncio.gather(*streams)
    assert streamed_content(first) == streamed_content(second) == CONTENT
    positions = [int(x.split(b"=")[1].split()[0]) for x in lines(second) if QUEUED.match(x)]
    assert positions[0] == 2 and positions[-1] == 1 and positions == sorted(positions, reverse=True), positions
    await settled(gw, sim)


async def test_engine_read_timeout_after_a_heartbeat_is_an_error_event(stack: contextlib.AsyncExitStack) -> None:
    """An engine silent past --upstream-read-timeout, after the heartbeat sent the 200: a 504-type error event."""
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], stream_heartbeat=BEAT, upstream_read_timeout=0.5)
    await sim.faults(hang=True)
    status, headers, raw = await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    error = error_event(raw)
    assert error["code"] == "upstream_timeout"
    assert all(PREFILL.match(x) for x in lines(raw)[:-2])
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="upstream_timeout") == 1
    await settled(gw, sim)


# -- before the first heartbeat, nothing changes -------------------------------------------------------------


# case: (status, code in the body, error_type counted or None for the client's own 4xx)
FAST_ERRORS = {
    "context_exceeded": (400, 400, "context_exceeded"),
    "queue_full": (429, "queue_full", "queue_full"),
    "queue_timeout": (503, "queue_timeout", "queue_timeout"),
    "engine_400": (400, 400, None),
    "engine_500": (500, 500, "upstream_error"),
}


@pytest.mark.parametrize("case", FAST_ERRORS)
async def test_fast_errors_keep_their_status_before_the_first_heartbeat(
    stack: contextlib.AsyncExitStack, case: str
) -> None:
    """With the heartbeat on, a stream refused before the interval passed gets the status and JSON it always
    got: the gateway's 400 for an over-long prompt, 429 queue full, 503 queue timeout; the engine's own 400
    (a window smaller than the gateway thinks) and 500 pass through as they were."""
    sim = await sim_in(stack, max_model_len=64)
    heartbeat = BEAT if case in ("context_exceeded", "queue_full") else 30.0  # the error comes well before it
    gw = await gateway_in(
        stack, [sim.url], stream_heartbeat=heartbeat, max_concurrency=1, max_queue=0 if case == "queue_full" else 8,
        queue_timeout=0.1, context_window=100_000 if case == "engine_400" else 64,
    )  # fmt: skip
    holder = await hold_the_slot(gw, sim) if case.startswith("queue") else None
    if case == "engine_500":
        await sim.faults(error_rate=1.0, error_status=500)
    content = "long " * 500 if case in ("context_exceeded", "engine_400") else "Hello"
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": True}
    status, headers, raw = await post(gw.url + CHAT, json_body=body)
    if holder is not None:
        await leave(holder)
    want_status, code, error_type = FAST_ERRORS[case]
    assert status == want_status, raw
    assert headers["Content-Type"].startswith("application/json")
    if case == "context_exceeded":
        error_body(json.loads(raw), code=code, type="BadRequestError", param="input_tokens")
    elif case.startswith("engine"):
        assert json.loads(raw)["error"]["code"] == code  # vLLM's own error JSON, untouched
        assert sim.outcomes()[-1] == ("rejected" if case == "engine_400" else "error 500")
    else:
        assert int(headers["Retry-After"]) >= 1
        error_body(json.loads(raw), code=code)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint="chat_completions", status=str(want_status)) == 1
    if error_type is not None:
        assert value(text, "gateway_request_errors_total", endpoint="chat_completions", error_type=error_type) == 1
    else:
        assert value(text, "gateway_request_errors_total", endpoint="chat_completions") == 0
    await settled(gw, sim)


async def test_engine_keep_alive_passes_through_without_doubling_the_heartbeat(
    stack: contextlib.AsyncExitStack,
) -> None:
    """vLLM's `: keep-alive` every 0.02 s keeps the client's connection busy: the gateway's own prefill
    comment (due after 0.5 s without a byte) never comes, and no keep-alive counts as a token."""
    sim = await sim_in(stack, ttft=0.8, sse_keep_alive_interval=0.02)
    gw = await gateway_in(stack, [sim.url], stream_heartbeat=0.5)
    status, _, raw = await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO, "stream": True})
    assert status == 200
    assert raw.count(b": keep-alive\n\n") > 1
    assert b": prefill" not in raw and b": queued" not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum") == 16
    await settled(gw, sim)


# -- behind a real nginx with a 3 s proxy_read_timeout ----------------------------------------------------

NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    proxy_http_version 1.1;
    proxy_buffering off;
    proxy_read_timeout 3s;
{servers}}}
"""
NGINX_SERVER = "    server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass {upstream}; }} }}\n"


@contextlib.contextmanager
def nginx_in_front(workdir: Path, upstreams: list[str]) -> Any:
    """A real nginx with one server per upstream; yields their URLs and the error log's path."""
    ports = [free_port() for _ in upstreams]
    servers = "".join(NGINX_SERVER.format(port=p, upstream=u) for p, u in zip(ports, upstreams, strict=True))
    user = f"user {pwd.getpwuid(0).pw_name};\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, dir=workdir, servers=servers))
    proc = subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield [f"http://127.0.0.1:{p}" for p in ports], workdir / "error.log"
    finally:
        proc.terminate()
        proc.wait(10)


async def stream_through(url: str) -> tuple[int, bytes, str | None]:
    """Status, the bytes that arrived, and the error that cut them off (None when the answer was whole)."""
    body = {"model": MODEL, "messages": HELLO, "stream": True}
    raw = bytearray()
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body) as r:
        try:
            async for chunk in r.content.iter_any():
                raw += chunk
        except aiohttp.ClientPayloadError as exc:
            return r.status, bytes(raw), str(exc)
        return r.status, bytes(raw), None


async def test_nginx_with_a_3s_read_timeout_keeps_a_10s_prefill_only_with_the_heartbeat(
    stack: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    """The same 8 s prefill through nginx (proxy_read_timeout 3s, proxy_buffering off), side by side: with
    --stream-heartbeat 1 it arrives whole; without it nginx cuts the silent stream."""
    sim = await sim_in(stack, ttft=8.0)
    beating = await gateway_in(stack, [sim.url], stream_heartbeat=1.0)
    silent = await gateway_in(stack, [sim.url], stream_heartbeat=0.0)
    with nginx_in_front(tmp_path, [beating.url, silent.url]) as (urls, error_log):
        for url in urls:
            await wait_for_http(url + "/health/live")
        (status, raw, cut), (cut_status, cut_raw, cut_error) = await asyncio.gather(*map(stream_through, urls))
        log = error_log.read_text(errors="replace")

    assert (status, cut) == (200, None)
    assert raw.count(b": prefill elapsed=") >= 1 and raw.endswith(b"data: [DONE]\n\n")
    assert streamed_content(raw) == CONTENT

    assert cut_status == 200 and cut_error is not None  # the engine's 200 went out, then nothing
    assert b"data:" not in cut_raw
    assert "upstream timed out" in log
    await wait_for(lambda: silent.gateway.proxy.active == 0, "nginx's cut to reach the gateway")
    text = await silent.metrics()
    assert value(text, "gateway_client_disconnects_total", phase="prefill") == 1
    await settled(beating, sim)
    await settled(silent, sim)


async def wait_for_http(url: str) -> None:
    """Poll until ``url`` answers 200 (nginx is up and reaches the gateway)."""
    async with aiohttp.ClientSession() as s:
        for _ in range(400):
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not answer")


# -- the long-context metrics --------------------------------------------------------------------------------


async def test_ttft_by_prompt_band_and_prefill_speed_of_streams(stack: contextlib.AsyncExitStack) -> None:
    """A short chat lands in the 8k band, a 40,000-token prompt in 128k; streams observe the engine's
    prefill speed (prompt tokens over its time to the first token), a non-streamed answer does not."""
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url])
    long_prompt = {"model": MODEL, "prompt": [7] * 40_000, "max_tokens": 4}
    for path, body in (
        (CHAT, {"model": MODEL, "messages": HELLO, "stream": True}),
        (COMPLETIONS, {**long_prompt, "stream": True}),
        (COMPLETIONS, long_prompt),
    ):
        status, _, _ = await post(gw.url + path, json_body=body)
        assert status == 200
    text = await gw.metrics()
    ttft = "gateway_time_to_first_token_seconds_count"
    assert value(text, ttft, endpoint="chat_completions", prompt_band="8k") == 1
    assert value(text, ttft, endpoint="completions", prompt_band="128k") == 2
    assert value(text, ttft) == 3
    assert value(text, "gateway_prefill_tokens_per_second_count", model=MODEL) == 2
    assert value(text, "gateway_prefill_tokens_per_second_sum", model=MODEL) > 0
    await settled(gw, sim)


async def test_oldest_request_age_while_queued_and_forwarded(stack: contextlib.AsyncExitStack) -> None:
    """One request hangs in the engine, one waits behind it: both ages are above 0; once they leave, 0."""
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1)
    age = "gateway_oldest_request_age_seconds"
    text = await gw.metrics()
    assert value(text, age, phase="queued") == 0 and value(text, age, phase="forwarded") == 0
    holder = await hold_the_slot(gw, sim)
    waiter = asyncio.create_task(post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO}))
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the second request to queue")
    text = await gw.metrics()
    assert value(text, age, phase="forwarded") > value(text, age, phase="queued") > 0
    await leave(waiter)
    await leave(holder)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, age, phase="queued") == 0 and value(text, age, phase="forwarded") == 0


async def test_clients_that_leave_count_by_phase_with_their_prompt_tokens(stack: contextlib.AsyncExitStack) -> None:
    """A client leaves while queued (2,000 prompt tokens), one in prefill (1,000), one in decode (3,000):
    gateway_client_disconnects_total and gateway_aborted_tokens_total by the phase each left in."""
    sim = await sim_in(stack, itl=0.2)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, stream_heartbeat=BEAT)

    def body(token: int, n: int) -> dict[str, Any]:
        return {"model": MODEL, "prompt": [token] * n, "stream": True, "max_tokens": 50}

    in_prefill = await hold_the_slot(gw, sim, COMPLETIONS, body(1, 1000))
    queued = asyncio.create_task(post(gw.url + COMPLETIONS, json_body=body(2, 2000)))
    await wait_for(
        lambda: any(ex.heartbeat and ex.heartbeat.response for ex in gw.gateway.proxy.queued), "a queued heartbeat"
    )
    await leave(queued)
    await leave(in_prefill)
    await wait_for(lambda: gw.gateway.proxy.active == 0, "both handlers to end")

    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + COMPLETIONS, json=body(3, 3000))
        async for line in r.content:
            if line.startswith(b'data: {"id"'):
                break  # the first token arrived: the client leaves mid-decode
        r.close()
    await wait_for(lambda: gw.gateway.proxy.active == 0, "the decode handler to end")

    text = await gw.metrics()
    for phase, tokens in (("queued", 2000), ("prefill", 1000), ("decode", 3000)):
        assert value(text, "gateway_client_disconnects_total", phase=phase) == 1, phase
        assert value(text, "gateway_aborted_tokens_total", phase=phase) == tokens, phase
    assert value(text, "gateway_request_errors_total", error_type="client_disconnected") == 3
    await settled(gw, sim)
