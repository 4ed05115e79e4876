"""--workers 2 as real processes in front of the real sim: both serve, one truthful /metrics, global limits,
a killed worker restarted with no counter going backwards, and SIGTERM draining both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from gateway.access.keys import digest
from tests.harness import CHAT, HELLO, MODEL, Process, free_port, samples, value, wait_http

SLOW = 150  # tokens at the sim's 2 ms each: a request that stays at the engine while others arrive
TEAM = "sk-team-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef"


@contextlib.contextmanager
def stack(*flags: str, sim_flags: tuple[str, ...] = ()) -> Iterator[tuple[str, str, Process]]:
    """The sim and a gateway of two workers in front of it, as processes; stopped at the end."""
    sim_port, gw_port = free_port(), free_port()
    sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    sim = Process("sim", "--host", "127.0.0.1", "--port", str(sim_port), "--itl", "0.002", "--ttft", "0.005",
                  *sim_flags)  # fmt: skip
    gw = None
    try:
        wait_http(sim_url + "/health")
        gw = Process(
            "serve", "--host", "127.0.0.1", "--port", str(gw_port), "--upstream", sim_url, "--workers", "2",
            "--access-log", "off", "--log-level", "info", "--health-interval", "0.2", *flags,
        )  # fmt: skip
        wait_http(gw_url + "/health/ready")
        yield sim_url, gw_url, gw
    finally:
        if gw is not None:
            if gw.proc.poll() is None:  # drained, so that the parent removes its coordination socket
                gw.signal(signal.SIGTERM)
                gw.wait(30)
            gw.stop()
        sim.stop()


async def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    """One scrape on a connection of its own: any worker may answer it."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(url + "/metrics", headers=headers) as r:
        assert r.status == 200
        return await r.text()


async def chat(url: str, max_tokens: int = 2, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request on a new connection."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.post(url + CHAT, json=body, headers=headers) as r:
        return r.status, await r.json()


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an event (the bound only stops a hung test)."""
    for _ in range(3000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def counted(url: str, total: int, headers: dict[str, str] | None = None) -> None:
    """Wait until the last answers are counted: a client has its last byte a moment before the gateway
    finishes the request's accounting."""

    async def done() -> bool:
        return answered(await scrape(url, headers)) == total

    await until(done, f"{total} answers counted")


def answered(text: str, status: str = "200") -> float:
    return value(text, "gateway_requests_total", model=MODEL, endpoint="chat_completions", status=status,
                 key="anonymous")  # fmt: skip


def cumulative(text: str) -> dict[Any, float]:
    """Every gateway counter and histogram sample: what may never go down (process_* and python_* are the
    answering worker's own)."""
    return {
        k: v
        for k, v in samples(text).items()
        if k[0].startswith("gateway_") and k[0].endswith(("_total", "_count", "_sum", "_bucket"))
    }


async def test_both_workers_serve_and_every_scrape_gives_the_same_exact_totals() -> None:
    with stack() as (_, url, _gw):
        sent = 0
        while not all(w["admitted"] for w in (await get_json(url + "/status"))["workers"]):
            assert sent < 400, "one worker took every connection"
            results = await asyncio.gather(*(chat(url) for _ in range(40)))
            assert all(status == 200 for status, _ in results)
            sent += len(results)
        await counted(url, sent)
        status = await get_json(url + "/status")
        assert sum(w["admitted"] for w in status["workers"]) == sent
        assert {w["index"] for w in status["workers"]} == {0, 1}
        scrapes = await asyncio.gather(*(scrape(url) for _ in range(8)))
        totals = {answered(text) for text in scrapes}
        assert totals == {sent}
        for text in scrapes:
            assert value(text, "gateway_requests_in_flight") == 0
            assert value(text, "gateway_queue_depth") == 0
            duration = "gateway_request_duration_seconds_count"
            assert value(text, duration, model=MODEL, endpoint="chat_completions", status="200") == sent
            assert text.count("# TYPE gateway_requests_total counter") == 1  # one family, not one per worker


async def test_max_concurrency_holds_across_workers() -> None:
    with stack("--max-concurrency", "3") as (sim, url, _gw):
        results = await asyncio.gather(*(chat(url, SLOW) for _ in range(20)))
        assert [status for status, _ in results] == [200] * 20
        assert all(body["usage"]["completion_tokens"] == SLOW for _, body in results)
        state = await get_json(sim + "/admin/state")
        assert 1 <= state["peak_running"] <= 3
        assert state["running"] == 0
        await counted(url, 20)
        text = await scrape(url)
        assert answered(text) == 20
        assert value(text, "gateway_concurrency_limit") == 3
        assert value(text, "gateway_requests_in_flight") == 0
        workers = (await get_json(url + "/status"))["workers"]
        assert sum(w["admitted"] for w in workers) == 20


async def test_a_killed_worker_is_restarted_and_no_counter_goes_backwards() -> None:
    with stack() as (_, url, gw):
        results = await asyncio.gather(*(chat(url) for _ in range(30)))
        assert all(status == 200 for status, _ in results)
        await counted(url, 30)
        before = await scrape(url)
        assert answered(before) == 30
        victim = (await get_json(url + "/status"))["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)

        async def restarted() -> bool:
            worker = (await get_json(url + "/status"))["workers"][0]
            return worker["restarts"] == 1 and worker["pid"] != victim["pid"] and worker["connected"]

        await until(restarted, "worker 0 to be started again")
        wait_http(url + "/health/ready")
        after = await scrape(url)
        old, new = cumulative(before), cumulative(after)
        assert all(new.get(k, 0) >= v for k, v in old.items()), [k for k, v in old.items() if new.get(k, 0) < v]
        assert answered(after) == 30
        results = await asyncio.gather(*(chat(url) for _ in range(10)))
        assert all(status == 200 for status, _ in results)
        await counted(url, 40)
        gw.signal(signal.SIGTERM)
        assert gw.wait() == 0
        assert f"worker 0 (pid {victim['pid']}) died (exit -9): starting it again (restart 1)" in gw.output()


async def test_sigterm_drains_both_workers_and_the_parent_exits_0() -> None:
    with stack() as (sim, url, gw):
        requests = [asyncio.ensure_future(chat(url, SLOW)) for _ in range(8)]

        async def running() -> bool:
            return (await get_json(sim + "/admin/state"))["running"] == 8

        await until(running, "the 8 requests to be at the engine")
        workers = (await get_json(url + "/status"))["workers"]
        gw.signal(signal.SIGTERM)
        results = await asyncio.gather(*requests)
        assert [status for status, _ in results] == [200] * 8  # in flight when the drain began: finished
        code = await asyncio.to_thread(gw.wait)
        output = gw.output()
        assert code == 0, output
        for w in workers:
            assert f"worker {w['index']} (pid {w['pid']}) exited 0" in output
        assert "every worker exited (0, 0)" in output


async def test_a_keys_rate_limit_holds_across_workers(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[key]]\nname = "admin"\nsha256 = "{digest(ADMIN)}"\nadmin = true\n'
        f'[[key]]\nname = "team"\nsha256 = "{digest(TEAM)}"\nrequests_per_minute = 4\n'
    )
    with stack("--keys-file", str(keys)) as (_, url, _gw):
        results = [await chat(url, headers={"Authorization": f"Bearer {TEAM}"}) for _ in range(12)]
        granted = sum(status == 200 for status, _ in results)
        refused = [body for status, body in results if status == 429]
        assert granted + len(refused) == 12
        assert 1 <= granted <= 4  # each worker allows 4 / 2 a minute: never more than 4 together
        assert all(body["error"]["code"] == "rate_limited" for body in refused)
        text = await scrape(url, {"Authorization": f"Bearer {ADMIN}"})
        assert value(text, "gateway_rate_limited_total", key="team", limit="requests") == len(refused)
        assert value(text, "gateway_requests_in_flight") == 0
        assert value(text, "gateway_key_requests_in_flight", key="team") == 0
