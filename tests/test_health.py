"""Liveness, readiness with hysteresis, the /health JSON, /status, and draining on SIGTERM as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest

from gateway.upstreams import Upstream, UpstreamPool
from tests.harness import (
    HELLO,
    MODEL,
    Gw,
    Process,
    Sim,
    free_port,
    start_gateway,
    start_sim,
    start_sim_at,
    value,
    wait_for,
    wait_http,
)


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


# -- liveness and readiness -----------------------------------------------------------------------------


async def test_live_and_ready_with_a_ready_engine(gw: Gw) -> None:
    assert await get(gw.url + "/health/live") == (200, {"status": "alive"})
    assert await get(gw.url + "/health/ready") == (200, {"status": "ready", "reasons": []})


async def test_not_ready_before_the_first_check_but_alive() -> None:
    gw = await start_gateway([f"http://127.0.0.1:{free_port()}"], wait_ready=False)
    try:
        status, body = await get(gw.url + "/health/ready")
        assert status == 503 and body["status"] == "not ready" and body["reasons"]
        assert await get(gw.url + "/health/live") == (200, {"status": "alive"})
    finally:
        await gw.close()


def test_hysteresis_counts_checks_exactly() -> None:
    pool = UpstreamPool(["http://engine:8000/"], fail_threshold=3, success_threshold=2)
    (u,) = pool.upstreams
    assert u.url == "http://engine:8000" and not u.up and not pool.any_up
    models = {MODEL: 1048576}

    pool.record_check(u, None, models)  # a fresh engine is up at its first good check
    assert u.up and u.models == models and pool.models() == models

    for _ in range(2):  # fewer than fail_threshold failures do not flip it
        pool.record_check(u, "ClientConnectorError: refused", None)
        assert u.up
    pool.record_check(u, None, models)  # a success in between starts the count again
    for _ in range(2):
        pool.record_check(u, "TimeoutError", None)
        assert u.up
    pool.record_check(u, "TimeoutError", None)  # the third in a row
    assert not u.up and not pool.any_up and u.last_error == "TimeoutError"

    pool.record_check(u, None, models)  # one success is not enough to come back
    assert not u.up
    pool.record_check(u, "TimeoutError", None)  # and a failure restarts the success count
    pool.record_check(u, None, models)
    assert not u.up
    pool.record_check(u, None, models)
    assert u.up

    pool.mark_down(u, "connection refused by a request")  # a request that cannot connect: down at once
    assert not u.up and u.last_error == "connection refused by a request"
    pool.record_check(u, None, models)
    assert not u.up
    pool.record_check(u, None, models)
    assert u.up


def test_an_engine_failing_its_first_checks_needs_the_success_threshold() -> None:
    pool = UpstreamPool(["http://a:1", "http://b:1"], fail_threshold=2, success_threshold=3)
    a, b = pool.upstreams
    pool.record_check(a, "ClientConnectorError: loading", None)  # vLLM refuses connections while it loads
    for _ in range(2):
        pool.record_check(a, None, {MODEL: 8})
        assert not a.up
    pool.record_check(a, None, {MODEL: 8})
    assert a.up and not b.up and pool.any_up
    assert pool.serving(MODEL) == [a]  # b, never checked well, is not known to serve it


@pytest.fixture
def checks(gw_cycle: Gw) -> Iterator[list[tuple[bool, bool, list[str]]]]:
    """Every health-check result as it is recorded: (check passed, upstream up after it, readiness reasons)."""
    pool, health = gw_cycle.gateway.pool, gw_cycle.gateway.health
    original = pool.record_check
    log: list[tuple[bool, bool, list[str]]] = []

    def record(upstream: Upstream, error: str | None, models: dict[str, int] | None) -> None:
        original(upstream, error, models)
        log.append((error is None, upstream.up, health.reasons()))

    pool.record_check = record  # type: ignore[method-assign]
    yield log
    pool.record_check = original  # type: ignore[method-assign]


@pytest.fixture
async def engine() -> AsyncIterator[dict[str, Sim]]:
    holder = {"sim": await start_sim()}
    yield holder
    await holder["sim"].close()


@pytest.fixture
async def gw_cycle(engine: dict[str, Sim]) -> AsyncIterator[Gw]:
    g = await start_gateway(
        [engine["sim"].url], health_interval=0.05, health_fail_threshold=3, health_success_threshold=2
    )
    yield g
    await g.close()


async def test_engine_down_then_back_on_the_same_port(
    gw_cycle: Gw, engine: dict[str, Sim], checks: list[tuple[bool, bool, list[str]]]
) -> None:
    gw, sim = gw_cycle, engine["sim"]
    fail_n, ok_n = gw.gateway.settings.health_fail_threshold, gw.gateway.settings.health_success_threshold
    assert (await get(gw.url + "/health/ready"))[0] == 200
    port = int(sim.url.rsplit(":", 1)[1])

    # the engine goes away
    mark = len(checks)
    await sim.close()

    async def ready_status() -> int:
        return (await get(gw.url + "/health/ready"))[0]

    status = 200
    while status == 200:
        assert (await get(gw.url + "/health/live"))[0] == 200
        status = await ready_status()
        if status == 200:
            seen = len(checks)
            await wait_for(lambda seen=seen: len(checks) > seen, "another health check")
    status, body = await get(gw.url + "/health/ready")
    assert status == 503 and body["status"] == "not ready"
    assert any(r.startswith(f"upstream {sim.url} is down: ") for r in body["reasons"]), body
    assert await get(gw.url + "/health/live") == (200, {"status": "alive"})

    failures = [c for c in checks[mark:] if not c[0]]
    first_down = next(i for i, c in enumerate(failures) if not c[1])
    assert first_down == fail_n - 1, f"down after {first_down + 1} failed checks, threshold {fail_n}"
    for _, up, reasons in failures[:first_down]:
        assert up and reasons == [], "ready must hold until the fail threshold"
    assert failures[first_down][2], "not ready must say why"

    # the engine comes back where the gateway expects it
    mark = len(checks)
    engine["sim"] = await start_sim_at(port)
    await wait_for(lambda: gw.gateway.pool.any_up, "the engine to be marked up again")
    assert await ready_status() == 200
    back = [c for c in checks[mark:] if c[0]]
    first_up = next(i for i, c in enumerate(back) if c[1])
    assert first_up == ok_n - 1, f"up after {first_up + 1} good checks, threshold {ok_n}"
    for _, up, reasons in back[:first_up]:
        assert not up and reasons, "not ready until the success threshold"

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert reply.usage is not None and reply.usage.completion_tokens == 2
    finally:
        await client.close()


# -- /health and /status ----------------------------------------------------------------------------------


async def test_health_json(gw: Gw, sim: Sim, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    await sim.faults(drop_after_tokens=1)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await sim.faults(drop_after_tokens=-1)
    await wait_for(lambda: gw.gateway.proxy.active == 0, "the handlers to return")

    before = time.time()
    status, body = await get(gw.url + "/health")
    after = time.time()
    assert status == 200
    assert body["status"] == "healthy" and body["reasons"] == []
    assert before <= body["timestamp"] <= after
    assert isinstance(body["uptime_seconds"], float | int) and body["uptime_seconds"] >= 0
    assert body["model_loaded"] is True and body["models"] == [MODEL]
    assert isinstance(body["gpu_available"], bool)
    resources = body["system_resources"]
    for key in ("cpu_percent", "cpu_count", "memory_total_bytes", "memory_available_bytes", "memory_percent"):
        assert isinstance(resources[key], int | float), key
    assert 0 < resources["memory_available_bytes"] <= resources["memory_total_bytes"]
    assert body["requests"] == {"total": 2, "failed": 1, "success_rate": 0.5}
    (upstream,) = body["upstreams"]
    assert upstream["url"] == sim.url and upstream["up"] is True and upstream["models"] == {MODEL: 1048576}


async def test_health_status_code_follows_readiness() -> None:
    gw = await start_gateway([f"http://127.0.0.1:{free_port()}"], wait_ready=False)
    try:
        await wait_for(lambda: gw.gateway.pool.upstreams[0].last_check, "a first health check")
        status, body = await get(gw.url + "/health")
        assert status == 503
        assert body["status"] == "unhealthy" and body["reasons"] and body["model_loaded"] is False
        assert body["requests"] == {"total": 0, "failed": 0, "success_rate": 1.0}
        assert body["upstreams"][0]["up"] is False and body["upstreams"][0]["last_error"]
    finally:
        await gw.close()


async def test_status_page(gw: Gw, sim: Sim) -> None:
    status, body = await get(gw.url + "/status")
    assert status == 200
    assert body["ready"] is True and body["reasons"] == [] and body["draining"] is False
    assert isinstance(body["version"], str) and body["version"]
    settings = body["settings"]
    assert settings["upstream"] == [sim.url]
    assert settings["health_fail_threshold"] == gw.gateway.settings.health_fail_threshold
    assert settings["max_concurrency"] == gw.gateway.settings.max_concurrency
    assert body["context_window"] == sim.engine.settings.max_model_len
    admission = body["admission"]
    assert admission["in_flight"] == 0 and admission["queue_depth"] == 0
    assert admission["max_queue"] == gw.gateway.settings.max_queue
    (upstream,) = body["upstreams"]
    assert upstream["url"] == sim.url and upstream["up"] is True
    assert isinstance(body["gpus"], list)
    assert body["host"]["memory_total_bytes"] > 0 and body["host"]["cpu_count"] >= 1
    json.dumps(body)  # plain JSON all the way down


# -- SIGTERM drain, as a real process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_process() -> Iterator[str]:
    port = free_port()
    proc = Process("sim", "--host", "127.0.0.1", "--port", str(port), "--itl", "0.05", "--ttft", "0.01")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def gateway_process(upstream: str) -> tuple[Process, str]:
    port = free_port()
    proc = Process(
        "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--upstream", upstream,
        "--drain-timeout", "30",
        "--health-interval", "0.2",
        "--log-level", "warning",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health/ready")
    except BaseException:
        proc.stop()
        raise
    return proc, url


class SSE:
    """A raw stream through the gateway: every event, and whether [DONE] closed it."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.tokens = 0
        self.done = False
        self.error: dict[str, object] | None = None  # vLLM's error event, when the stream was cut
        self._buf = b""

    async def next_event(self) -> bytes | None:
        while b"\n\n" not in self._buf:
            chunk = await self.resp.content.readany()
            if not chunk:
                return None
            self._buf += chunk
        event, self._buf = self._buf.split(b"\n\n", 1)
        if event == b"data: [DONE]":
            self.done = True
        else:
            data = json.loads(event.removeprefix(b"data: "))
            if "error" in data:
                self.error = data["error"]
            else:
                self.tokens += bool(data["choices"][0]["delta"].get("content"))
        return event

    async def first_token(self) -> None:
        while self.tokens == 0:
            assert await self.next_event() is not None, "the stream ended before its first token"

    async def rest(self) -> None:
        try:
            while await self.next_event() is not None:
                pass
        except aiohttp.ClientPayloadError:
            pass  # cut off


async def ready_turns_503(url: str) -> dict[str, Any]:
    while True:
        status, body = await get(url + "/health/ready")
        if status == 503:
            return body
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def stream_then_sigterm(
    proc: Process, url: str, max_tokens: int
) -> AsyncIterator[tuple[aiohttp.ClientSession, SSE]]:
    """Open a stream through the gateway process, wait for its first token, then send SIGTERM."""
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, "stream": True}
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            sse = SSE(resp)
            await sse.first_token()
            proc.signal(signal.SIGTERM)
            yield session, sse


async def test_sigterm_drains_open_streams_and_exits_0(sim_process: str) -> None:
    proc, url = gateway_process(sim_process)
    try:
        async with stream_then_sigterm(proc, url, 40) as (session, sse):
            ready = await asyncio.wait_for(ready_turns_503(url), 20)
            assert ready["status"] == "not ready"
            assert any(r.startswith("draining") for r in ready["reasons"]), ready
            assert (await get(url + "/health/live"))[0] == 200
            async with session.get(url + "/metrics") as page:
                assert page.status == 200
                text = await page.text()
            assert value(text, "gateway_draining") == 1
            assert value(text, "gateway_requests_in_flight") == 1

            async with session.post(
                url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2}
            ) as refused:
                assert refused.status == 503
                assert int(refused.headers["Retry-After"]) >= 1
                error = (await refused.json())["error"]
                assert error["code"] == "draining"

            await sse.rest()
            assert sse.done and sse.tokens == 40
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        proc.stop()


async def test_second_sigterm_cuts_streams_off_and_exits_0(sim_process: str) -> None:
    proc, url = gateway_process(sim_process)
    try:
        async with stream_then_sigterm(proc, url, 2000) as (_session, sse):
            await asyncio.wait_for(ready_turns_503(url), 20)
            proc.signal(signal.SIGTERM)
            await asyncio.wait_for(sse.rest(), 30)
            # cut there and then, as vLLM ends a failed stream: an error event, then [DONE]
            assert sse.error is not None and sse.done and 0 < sse.tokens < 2000
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert "second SIGTERM" in proc.output()
    finally:
        proc.stop()
