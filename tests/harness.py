"""Test harness: the real gateway and the real simulated engine on loopback, in-process or as processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import openai
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway, make_runner
from gateway.metrics.gpu import GpuCollector
from gateway.settings import Settings, SimSettings
from gateway.sim.engine import SimEngine, bound_port, serve

FAST_SIM = {"ttft": 0.005, "itl": 0.001, "prefill_tokens_per_s": 1e9}
# the access log is tested on the processes of test_accesslog; here its lines would only clutter the output
FAST_GATEWAY = {"health_interval": 0.1, "health_fail_threshold": 2, "health_success_threshold": 2, "access_log": "off"}

MODEL = "glm-4-9b-chat-1m"
HELLO = [{"role": "user", "content": "Hello"}]
CHAT = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Sim:
    engine: SimEngine
    runner: web.AppRunner
    url: str

    async def faults(self, **values: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(self.url + "/admin/faults", json=values) as r:
            assert r.status == 200, await r.text()

    async def state(self) -> dict[str, Any]:
        """``GET /admin/state``: running, peak_running (since start or reset), waiting, aborted, the journal."""
        async with aiohttp.ClientSession() as s, s.get(self.url + "/admin/state") as r:
            assert r.status == 200
            return await r.json()

    async def reset(self) -> None:
        """``POST /admin/reset``: faults off; journal, peak_running and prefix cache cleared."""
        async with aiohttp.ClientSession() as s, s.post(self.url + "/admin/reset") as r:
            assert r.status == 200

    @property
    def journal(self) -> list[dict[str, Any]]:
        return list(self.engine.journal)

    def outcomes(self) -> list[str]:
        return [e["outcome"] for e in self.engine.journal]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_sim(**overrides: Any) -> Sim:
    settings = SimSettings(**{"port": 0, **FAST_SIM, **overrides})
    engine = SimEngine(settings)
    runner = await serve(engine, "127.0.0.1", 0)
    return Sim(engine, runner, f"http://127.0.0.1:{bound_port(runner)}")


@dataclasses.dataclass
class Gw:
    gateway: Gateway
    runner: web.AppRunner
    url: str

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def close(self) -> None:
        await self.runner.cleanup()

    def assert_idle(self) -> None:
        """Nothing left behind: no slot, queue place, token, upstream request or handler."""
        gw = self.gateway
        assert gw.admission.in_flight == 0
        assert gw.admission.queue_depth == 0
        assert gw.admission.tokens_in_flight == 0
        assert gw.proxy.active == 0
        assert all(u.in_flight == 0 for u in gw.pool.upstreams)
        assert all(s.tokens == 0 for s in gw.router.states.values())  # no KV tokens held at an engine
        assert gw.router.waiting == 0


async def start_gateway(upstreams: list[str], *, wait_ready: bool = True, **overrides: Any) -> Gw:
    options = {"host": "127.0.0.1", "port": 0, "upstream": upstreams, **FAST_GATEWAY, **overrides}
    settings = Settings(**options)
    gateway = Gateway(settings)
    runner = make_runner(gateway.app(), settings, gateway.metrics, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    gw = Gw(gateway, runner, f"http://127.0.0.1:{bound_port(runner)}")
    if wait_ready:
        await wait_for(lambda: gateway.pool.any_up, "an upstream to be up")
    return gw


async def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Poll a condition (an event, not a timing threshold: the timeout only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


class Process:
    """A ``glm-gateway`` command run as a real process, stopped at the end of the test."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "gateway", *args]
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            text=True,
        )

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_http(url: str, timeout: float = 30.0, status: int | None = 200) -> None:
    """Block until url answers (with ``status`` if given)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if status is None or r.status == status:
                    return
        except urllib.error.HTTPError as e:
            if status is None or e.code == status:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer")
        time.sleep(0.05)


async def start_sim_at(port: int, **overrides: Any) -> Sim:
    """A simulated engine on a given port (to bring an engine back where the gateway expects it)."""
    settings = SimSettings(**{"port": port, **FAST_SIM, **overrides})
    engine = SimEngine(settings)
    runner = await serve(engine, "127.0.0.1", port)
    return Sim(engine, runner, f"http://127.0.0.1:{bound_port(runner)}")


async def sim_metrics(sim: Sim) -> str:
    """The simulated engine's /metrics, scraped as the gateway does (classic text format)."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(sim.url + "/metrics", headers={"Accept": "text/plain"}) as r,
    ):
        assert r.status == 200
        return await r.text()


def error_body(body: Any, *, code: Any, type: str | None = None, param: Any = None) -> dict[str, Any]:
    """Check an OpenAI JSON error body ``{"error": {"message","type","param","code"}}``; return the error."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["code"] == code, error
    if type is not None:
        assert error["type"] == type, error
    assert error["param"] == param, error
    return error


async def settled(gw: Gw, *sims: Sim) -> None:
    """Wait until every handler has returned and every engine is idle, then check nothing leaked."""
    await wait_for(lambda: gw.gateway.proxy.active == 0, "the gateway's handlers to return")
    for sim in sims:
        await wait_for(lambda s=sim: s.engine.running == 0 and s.engine.waiting == 0, "the engine to be idle")
    gw.assert_idle()


# -- helpers for the metrics, health and live Prometheus tests --------------------------------------------


class CountingSimEngine(SimEngine):
    """A simulated engine that notes the arrival time of every GET /metrics (to count the gateway's fetches)."""

    def __init__(self, settings: SimSettings) -> None:
        super().__init__(settings)
        self.metrics_fetches: list[float] = []

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.metrics_fetches.append(time.monotonic())
        return await super().metrics_page(request)


async def start_counting_sim(**overrides: Any) -> Sim:
    """Like start_sim, with a CountingSimEngine: ``sim.engine.metrics_fetches`` lists each /metrics GET."""
    settings = SimSettings(**{"port": 0, **FAST_SIM, **overrides})
    engine = CountingSimEngine(settings)
    runner = await serve(engine, "127.0.0.1", 0)
    return Sim(engine, runner, f"http://127.0.0.1:{bound_port(runner)}")


def wait_until(predicate: Any, what: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Blocking twin of wait_for for synchronous tests; returns the predicate's first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def gpu_available() -> bool:
    """Whether this machine has an NVIDIA GPU the gateway's collector can read."""
    collector = GpuCollector()
    try:
        return collector.available
    finally:
        collector.close()


# -- helpers for tests that build their own engines and gateway (with the ``stack`` fixture) ----------------


async def sim_in(stack: contextlib.AsyncExitStack, **overrides: Any) -> Sim:
    """A simulated engine, closed when ``stack`` closes."""
    sim = await start_sim(**overrides)
    stack.push_async_callback(sim.close)
    return sim


async def gateway_in(
    stack: contextlib.AsyncExitStack, urls: list[str], *, wait_ready: bool = True, **overrides: Any
) -> Gw:
    """A gateway in front of ``urls``, closed when ``stack`` closes."""
    gw = await start_gateway(urls, wait_ready=wait_ready, **overrides)
    stack.push_async_callback(gw.close)
    return gw


async def client_in(stack: contextlib.AsyncExitStack, gw: Gw) -> openai.AsyncOpenAI:
    """An OpenAI client for ``gw`` (no retries, 30 s timeout), closed when ``stack`` closes."""
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30.0)
    stack.push_async_callback(client.close)
    return client


async def fetch(
    method: str, url: str, *, json_body: Any = None, data: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """One plain HTTP exchange: status, response headers, body bytes."""
    async with aiohttp.ClientSession() as s, s.request(method, url, json=json_body, data=data, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def post(
    url: str, *, json_body: Any = None, data: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """One plain HTTP POST: status, response headers, body bytes."""
    return await fetch("POST", url, json_body=json_body, data=data, headers=headers)


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
