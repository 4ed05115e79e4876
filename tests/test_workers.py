"""--workers 2 as real processes in front of the real sim: both serve, one truthful /metrics, global limits,
a killed worker restarted with no counter going backwards, SIGTERM draining both, and what runs once for the
host (the engines' checks, their breakers, the keys file's reload) reaching every worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.access.keys import digest
from tests.harness import CHAT, HELLO, MODEL, Process, error_body, free_port, samples, value, wait_http
from tests.test_discovery import HOSTS, NAME, dns_server, shared_port

SLOW = 150  # tokens at the sim's 2 ms each: a request that stays at the engine while others arrive
TEAM = "sk-team-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef"


def sim_process(host: str, port: int, *flags: str) -> Process:
    return Process("sim", "--host", host, "--port", str(port), "--itl", "0.002", "--ttft", "0.005", *flags)


@contextlib.contextmanager
def workers(*flags: str) -> Iterator[tuple[str, Process]]:
    """A gateway of two workers, as a process, once ready; drained and stopped at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = Process(
        "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--access-log", "off",
        "--log-level", "info", "--health-interval", "0.2", *flags,
    )  # fmt: skip
    try:
        wait_http(url + "/health/ready")
        yield url, gw
    finally:
        if gw.proc.poll() is None:  # drained, so that the parent removes its coordination socket
            gw.signal(signal.SIGTERM)
            gw.wait(30)
        gw.stop()


@contextlib.contextmanager
def stack(*flags: str, sim_flags: tuple[str, ...] = ()) -> Iterator[tuple[str, str, Process]]:
    """The sim and a gateway of two workers in front of it, as processes; stopped at the end."""
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim = sim_process("127.0.0.1", sim_port, *sim_flags)
    try:
        wait_http(sim_url + "/health")
        with workers("--upstream", sim_url, *flags) as (url, gw):
            yield sim_url, url, gw
    finally:
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


async def chat_on(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url + CHAT, json=body) as r:
        await r.read()
        return r.status


async def worker_of(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> int:
    async with session.get(url + "/status", headers=headers) as r:
        assert r.status == 200
        return int((await r.json())["worker"])


async def per_worker(
    sessions: AsyncExitStack, url: str, headers: dict[str, str] | None = None
) -> dict[int, aiohttp.ClientSession]:
    """A client kept on one connection to each worker: new connections until each worker has taken one (a worker
    still starting takes none yet)."""
    found: dict[int, aiohttp.ClientSession] = {}
    for _ in range(3000):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        worker = await worker_of(session, url, headers)
        if worker in found:
            await session.close()
            await asyncio.sleep(0.01)
            continue
        found[worker] = session
        sessions.push_async_callback(session.close)
        if len(found) == 2:
            return found
    raise AssertionError("one worker took every connection")


async def connections_to(sessions: AsyncExitStack, url: str, worker: int, count: int) -> list[aiohttp.ClientSession]:
    """``count`` clients, each kept on one connection to ``worker``."""
    found: list[aiohttp.ClientSession] = []
    for _ in range(3000):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        if await worker_of(session, url) != worker:
            await session.close()
            continue
        found.append(session)
        sessions.push_async_callback(session.close)
        if len(found) == count:
            return found
    raise AssertionError(f"worker {worker} took too few connections")


async def status_of(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Any:
    async with session.get(url + "/status", headers=headers) as r:
        assert r.status == 200
        return await r.json()


async def all_connected(url: str) -> bool:
    return all(w["connected"] for w in (await get_json(url + "/status"))["workers"])


async def faults(sim: str, **values: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(sim + "/admin/faults", json=values) as r:
        assert r.status == 200


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an event (the bound only stops a hung test)."""
    for _ in range(3000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def hung(
    sim: str, url: str, sessions: list[aiohttp.ClientSession], body: dict[str, Any]
) -> list[asyncio.Future[Any]]:
    """One request on each session, every one of them at the engine, which holds them (``hang``) until their
    clients leave."""
    await faults(sim, hang=True)
    held = [asyncio.ensure_future(session.post(url + CHAT, json=body)) for session in sessions]

    async def at_the_engine() -> bool:
        journal = (await get_json(sim + "/admin/state"))["requests"]
        return [e["outcome"] for e in journal].count("hang") == len(sessions)

    await until(at_the_engine, f"{len(sessions)} requests at the engine")
    return held


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
            names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
            assert len(names) == len(set(names)), "a family written twice: Prometheus refuses the scrape"
            lines = text.splitlines()
            # the engine's and the host's series once for the host, not once per worker
            assert sum(line.startswith("vllm:num_requests_running{") for line in lines) == 1
            assert sum(line.startswith("gateway_host_cpus ") for line in lines) == 1
            workers = {k[1] for k in samples(text) if k[0] == "process_resident_memory_bytes"}
            assert workers == {frozenset({("worker", w)}) for w in ("0", "1", "parent")}
            if shutil.which("promtool"):  # as Prometheus parses it (its lint of vLLM's names aside)
                command = ["promtool", "check", "metrics"]
                lint = await asyncio.to_thread(subprocess.run, command, input=text, capture_output=True, text=True)
                assert "error while linting" not in lint.stdout + lint.stderr, lint.stderr
            assert value(text, "gateway_requests_in_flight") == 0
            assert value(text, "gateway_queue_depth") == 0
            duration = "gateway_request_duration_seconds_count"
            assert value(text, duration, model=MODEL, endpoint="chat_completions", status="200") == sent
            assert text.count("# TYPE gateway_requests_total counter") == 1  # one family, not one per worker


@pytest.mark.parametrize(("limit", "sent"), [(3, 20), (16, 48)])  # 16: the workers keep spare slots, 2 each
async def test_max_concurrency_holds_across_workers(limit: int, sent: int) -> None:
    with stack("--max-concurrency", str(limit)) as (sim, url, _gw):
        results = await asyncio.gather(*(chat(url, SLOW) for _ in range(sent)))
        assert [status for status, _ in results] == [200] * sent
        assert all(body["usage"]["completion_tokens"] == SLOW for _, body in results)
        state = await get_json(sim + "/admin/state")
        assert 1 <= state["peak_running"] <= limit
        assert state["running"] == 0
        await counted(url, sent)
        text = await scrape(url)
        assert answered(text) == sent
        assert value(text, "gateway_concurrency_limit") == limit
        assert value(text, "gateway_requests_in_flight") == 0
        workers = (await get_json(url + "/status"))["workers"]
        assert sum(w["admitted"] for w in workers) == sent


async def test_a_worker_admits_from_its_spare_slots_and_every_count_stays_exact() -> None:
    """Freed slots kept spare in a worker admit its next requests without asking the parent; /status and
    /metrics count them, and what is in flight is what is in flight."""
    with stack() as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            for session in (await per_worker(sessions, url)).values():
                for _ in range(12):
                    async with session.post(url + CHAT, json={"model": MODEL, "messages": HELLO}) as r:
                        assert r.status == 200
                        await r.read()
        await counted(url, 24)
        status = await get_json(url + "/status")
        workers = status["workers"]
        assert sum(w["admitted"] for w in workers) == 24
        assert all(0 < w["from_spare"] < w["admitted"] for w in workers), workers  # the first ones asked
        admission = status["admission"]
        assert admission["lending"] is True
        assert admission["spare_slots"] == sum(w["spare_slots"] for w in workers) >= 2
        assert admission["in_flight"] == admission["tokens_in_flight"] == admission["queue_depth"] == 0
        text = await scrape(url)
        assert value(text, "gateway_requests_in_flight") == value(text, "gateway_tokens_in_flight") == 0
        assert (await get_json(sim + "/admin/state"))["peak_running"] == 1


async def test_spare_slots_are_called_back_before_a_request_waits_or_is_refused() -> None:
    """All 8 slots, one of them spare in the other worker: the 8th request through one worker gets it (with no
    queue at all), the 9th is refused, and the spare slots come back once the requests are gone."""
    with stack("--max-concurrency", "8", "--max-queue", "0") as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            pairs = await per_worker(sessions, url)
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            async with pairs[0].post(url + CHAT, json=body) as r:  # its slot kept spare by worker 0
                assert r.status == 200
                await r.read()

            async def spare() -> bool:
                return [w["spare_slots"] for w in (await get_json(url + "/status"))["workers"]] == [1, 0]

            await until(spare, "worker 0's spare slot")
            ones = await connections_to(sessions, url, 1, 8)
            held = await hung(sim, url, ones, body)
            assert not any(future.done() for future in held)  # none refused
            admission = (await get_json(url + "/status"))["admission"]
            assert (admission["in_flight"], admission["spare_slots"], admission["lending"]) == (8, 0, False)
            async with pairs[0].post(url + CHAT, json=body) as r:
                assert r.status == 429
                assert (await r.json())["error"]["code"] == "queue_full"
            for future in held:
                future.cancel()
            await faults(sim, hang=False)

            async def lending_again() -> bool:
                admission = (await get_json(url + "/status"))["admission"]
                return admission["in_flight"] == 0 and admission["lending"] is True

            await until(lending_again, "the slots free and lent again")


async def test_retry_after_counts_the_releases_that_workers_kept_as_spare_slots() -> None:
    """Requests that finished into a worker's spare slots were never released at the parent: when the slots are
    called back and the queue is full, Retry-After comes from their rate (a second), not from nothing measured
    (the queue timeout)."""
    with stack("--max-concurrency", "8", "--max-queue", "0", "--queue-timeout", "120") as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            pairs = await per_worker(sessions, url)
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            for _ in range(20):  # each one's slot kept spare by worker 0 and taken by the next
                assert await chat_on(pairs[0], url, body) == 200
            held = await hung(sim, url, await connections_to(sessions, url, 1, 8), body)
            async with pairs[0].post(url + CHAT, json=body) as r:
                assert r.status == 429
                assert (await r.json())["error"]["code"] == "queue_full"
                assert r.headers["Retry-After"] == "1"
            for future in held:
                future.cancel()
            await faults(sim, hang=False)


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
        status = await get_json(url + "/status")  # its slots, spare ones too, left with it
        assert status["admission"]["in_flight"] == status["admission"]["tokens_in_flight"] == 0
        assert status["admission"]["spare_slots"] == status["workers"][1]["spare_slots"]
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


async def test_a_worker_that_dies_while_a_scrape_waits_for_it_is_counted_once() -> None:
    """Worker 1 stopped, a scrape through worker 0 waits for its series; worker 1 is killed meanwhile: that scrape
    counts its requests once (from what the parent keeps of dead workers), as the scrapes before and after do."""
    with stack() as (_, url, _gw):
        async with AsyncExitStack() as sessions:
            ones = await connections_to(sessions, url, 1, 1)
            zero = (await connections_to(sessions, url, 0, 1))[0]
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            assert [await chat_on(session, url, body) for session in (*ones, zero, zero)] == [200] * 3
            total = answered(await scrape(url))  # (the requests that found the workers above count too)
            assert total >= 3
            victim = (await status_of(zero, url))["workers"][1]["pid"]
            os.kill(victim, signal.SIGSTOP)
            try:
                waiting = asyncio.ensure_future(zero.get(url + "/metrics"))
                await asyncio.sleep(0.3)  # the parent asked worker 1 for its series, which cannot answer
            finally:
                os.kill(victim, signal.SIGKILL)
            async with await waiting as r:
                assert r.status == 200
                assert answered(await r.text()) == total

            async def restarted() -> bool:
                worker = (await status_of(zero, url))["workers"][1]
                return worker["pid"] != victim and worker["connected"]

            await until(restarted, "worker 1 to be started again")
            assert answered(await scrape(url)) == total


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


@pytest.mark.parametrize("workers_first", [True, False], ids=["workers-first", "parent-first"])
async def test_sigterm_to_every_process_at_once_is_one_drain(workers_first: bool) -> None:
    """systemd's KillMode=control-group (or pkill) sends SIGTERM to the parent and to each worker: a worker takes
    its own and the parent's word to drain as one drain, and the requests in flight finish."""
    with stack() as (sim, url, gw):
        requests = [asyncio.ensure_future(chat(url, SLOW)) for _ in range(8)]

        async def running() -> bool:
            return (await get_json(sim + "/admin/state"))["running"] == 8

        await until(running, "the 8 requests to be at the engine")
        # (a worker still starting has no SIGTERM handler of its own yet)
        await until(lambda: all_connected(url), "both workers connected to the parent")
        pids = [w["pid"] for w in (await get_json(url + "/status"))["workers"]]
        if not workers_first:
            gw.signal(signal.SIGTERM)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        if workers_first:
            gw.signal(signal.SIGTERM)
        results = await asyncio.gather(*requests)
        assert [status for status, _ in results] == [200] * 8
        code = await asyncio.to_thread(gw.wait)
        output = gw.output()
        assert code == 0, output
        assert "cutting off" not in output, output


async def test_a_second_sigterm_to_the_parent_cuts_every_workers_requests_off() -> None:
    with stack() as (sim, url, gw):
        await faults(sim, hang=True)  # held at the engine: the drain can only end by the cut
        requests = [asyncio.ensure_future(chat(url)) for _ in range(8)]

        async def at_the_engine() -> bool:
            return [e["outcome"] for e in (await get_json(sim + "/admin/state"))["requests"]].count("hang") == 8

        await until(at_the_engine, "the 8 requests to be at the engine")
        gw.signal(signal.SIGTERM)

        async def draining() -> bool:  # a worker was told: the parent took the first signal (two at once are one)
            return bool((await get_json(url + "/status"))["draining"])

        await until(draining, "a worker to drain")
        gw.signal(signal.SIGTERM)
        results = await asyncio.gather(*requests)
        assert [status for status, _ in results] == [503] * 8
        for _, body in results:
            error_body(body, code="draining", type="server_error")
        code = await asyncio.to_thread(gw.wait)
        output = gw.output()
        assert code == 0, output
        assert "told to stop now: cutting off" in output, output


async def test_a_worker_sigtermed_alone_leaves_the_new_connections_to_the_others() -> None:
    """SIGTERM to one worker (not the parent): it drains what it runs and takes no new connection, so none is
    refused while another worker serves; once drained it exits and the parent starts it again."""
    with stack() as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            ones = await connections_to(sessions, url, 1, 2)
            await connections_to(sessions, url, 0, 1)  # (both serve)
            victim = (await status_of(ones[1], url))["workers"][1]["pid"]
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            held = await hung(sim, url, ones[:1], body)  # keeps worker 1's drain open
            await faults(sim, hang=False)
            try:
                os.kill(victim, signal.SIGTERM)

                async def draining() -> bool:
                    return bool((await status_of(ones[1], url))["draining"])

                await until(draining, "worker 1 to drain")
                results = [await chat(url) for _ in range(20)]  # each on a new connection
                assert [status for status, _ in results] == [200] * 20, results
            finally:
                held[0].cancel()

            async def restarted() -> bool:
                worker = (await get_json(url + "/status"))["workers"][1]
                return worker["pid"] != victim and worker["connected"] and worker["restarts"] == 1

            await until(restarted, "worker 1 to be started again")


def exited(pid: int) -> bool:
    """The process is gone, or a zombie (its parent is gone too, and nobody reaps it yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_a_worker_whose_parent_dies_refuses_what_waits_for_it_and_drains() -> None:
    """The parent SIGKILLed: what a worker waits for from it (a request queued there, a scrape) is answered 503
    `draining` at once, not at the drain's end; the request in flight goes on; then the worker exits."""
    flags = ("--max-concurrency", "1", "--max-queue", "4", "--queue-timeout", "60", "--drain-timeout", "60")
    with stack(*flags) as (sim, url, gw):
        async with AsyncExitStack() as sessions:
            zero = await connections_to(sessions, url, 0, 3)
            pids = [w["pid"] for w in (await status_of(zero[0], url))["workers"]]
            pid = pids[0]
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            held = await hung(sim, url, zero[:1], body)
            queued = asyncio.ensure_future(zero[1].post(url + CHAT, json=body))

            async def waiting() -> bool:
                return (await status_of(zero[2], url))["admission"]["queue_depth"] == 1

            await until(waiting, "the second request queued at the parent")
            scrape = asyncio.ensure_future(zero[2].get(url + "/metrics"))
            gw.signal(signal.SIGKILL)
            try:
                done, _ = await asyncio.wait([queued, scrape], timeout=30)  # (the drain would take 60 s)
                assert len(done) == 2, "a worker still waits for its dead parent"
                for answer in (queued.result(), scrape.result()):
                    assert answer.status == 503, await answer.text()
                    error_body(await answer.json(), code="draining", type="server_error")
                    assert answer.headers["Retry-After"] == "1"
                assert not exited(pid)  # the request at the engine holds the drain open
                held[0].cancel()  # its client leaves: the drain is over
                for _ in range(3000):
                    if exited(pid):
                        break
                    await asyncio.sleep(0.01)
                assert exited(pid), "the worker did not exit once its drain was over"
                await until(lambda: asyncio.to_thread(lambda: all(exited(p) for p in pids)), "both workers gone")
                output = await asyncio.to_thread(gw.output)  # (the workers' output: the pipe closed with them)
                assert re.search(r"draining \d+ requests for up to 60 s", output), output
                assert "second SIGTERM" not in output, output  # the parent's death is one signal: a drain, no cut
                assert "drained" in output, output
            finally:
                for future in (*held, queued, scrape):
                    future.cancel()
                for orphan in pids:  # (the other one, with nothing in flight, has exited by itself)
                    with contextlib.suppress(ProcessLookupError):
                        if not exited(orphan):
                            os.kill(orphan, signal.SIGKILL)


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


async def test_the_engines_are_checked_once_for_the_host_and_readiness_is_the_same_in_every_worker() -> None:
    with stack() as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            workers = await per_worker(sessions, url)

            async def rounds() -> int:  # the parent's rounds of checks, as each worker reports them
                counts = {(await status_of(s, url))["engine_checks"] for s in workers.values()}
                return max(counts)

            async def checks() -> int:  # the /health requests the engine answered
                return int((await get_json(sim + "/admin/state"))["health_checks"])

            # a round asks /health once and counts when done: between two reads, the engine sees one check per round
            first_before, first, first_after = await rounds(), await checks(), await rounds()

            async def six_more() -> bool:
                return await rounds() >= first_after + 6

            await until(six_more, "six rounds of checks")
            last_before, last, last_after = await rounds(), await checks(), await rounds()
            assert last_before - first_after - 1 <= last - first <= last_after - first_before + 1

            await faults(sim, refuse_seconds=600)

            async def not_ready() -> bool:
                return not any([(await status_of(s, url))["ready"] for s in workers.values()])

            await until(not_ready, "both workers to see the engine down")
            reasons = [(await status_of(s, url))["reasons"] for s in workers.values()]
            assert reasons[0] == reasons[1]
            assert reasons[0] and reasons[0][0].startswith(f"upstream {sim} is down: cannot connect")
            for index, session in workers.items():
                async with session.get(url + "/health/ready") as r:
                    assert r.status == 503
                    assert await r.json() == {"status": "not ready", "reasons": reasons[0]}
                assert await worker_of(session, url) == index  # each answer came from that worker


async def test_a_breaker_opened_through_one_worker_is_open_in_every_worker_and_closed_by_another() -> None:
    with stack("--breaker-failures", "3", "--breaker-cooldown", "600") as (sim, url, gw):
        async with AsyncExitStack() as sessions:
            workers = await per_worker(sessions, url)

            def breaker_in_both(state: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    answers = [await status_of(s, url) for s in workers.values()]
                    return all(a["upstreams"][0]["routing"]["breaker"] == state for a in answers)

                return check

            await faults(sim, error_rate=1.0)
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            for _ in range(3):  # through worker 0 alone
                async with workers[0].post(url + CHAT, json=body) as r:
                    assert r.status == 500  # the engine's answer, passed through
            assert await worker_of(workers[0], url) == 0
            await until(breaker_in_both("open"), "the breaker to be open in both workers")
            assert value(await scrape(url), "gateway_upstream_breaker_state", upstream=sim) == 2

            await faults(sim, error_rate=0.0)
            async with workers[1].post(url + CHAT, json=body) as r:  # the only engine: tried though open
                assert r.status == 200
            assert await worker_of(workers[1], url) == 1
            await until(breaker_in_both("closed"), "worker 1's good answer to close it in both workers")

            async def counted() -> bool:
                text = await scrape(url)
                return answered(text, "500") == 3 and answered(text) == 1

            await until(counted, "the answers counted")
            assert value(await scrape(url), "gateway_upstream_breaker_state", upstream=sim) == 0
        gw.signal(signal.SIGTERM)
        assert gw.wait() == 0
        output = gw.output()
        assert output.count("breaker open after 3 failures in a row") == 1, output  # one breaker for the host
        assert output.count("breaker closed after a good answer") == 1, output


def write_keys(path: Path, **keys: str) -> None:
    """The keys file, replaced as a whole (as editors and config management do)."""
    lines = "".join(
        f'[[key]]\nname = "{name}"\nsha256 = "{digest(key)}"\n' + ("admin = true\n" if name == "admin" else "")
        for name, key in keys.items()
    )
    draft = path.with_suffix(".draft")
    draft.write_text(lines)
    os.replace(draft, path)


NEW = "sk-new-0123456789abcdef"


async def test_a_keys_file_change_reaches_every_worker_on_sighup_and_by_itself(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, admin=ADMIN, team=TEAM)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    refused = 0

    async def models(session: aiohttp.ClientSession, key: str) -> int:
        nonlocal refused
        async with session.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status == 401:
                refused += 1
                error_body(await r.json(), code="invalid_api_key", type="invalid_request_error")
            return r.status

    def serving(allowed: str, removed: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return all([
                await models(s, allowed) == 200 and await models(s, removed) == 401 for s in workers.values()
            ])  # fmt: skip

        return check

    with stack("--keys-file", str(keys)) as (_, url, gw):
        async with AsyncExitStack() as sessions:
            workers = await per_worker(sessions, url, admin)
            assert await serving(TEAM, NEW)()
            write_keys(keys, admin=ADMIN, new=NEW)
            gw.signal(signal.SIGHUP)  # to the parent: it reads the file, and so does every worker
            await until(serving(NEW, TEAM), "both workers to take the new key and refuse the removed one")
            write_keys(keys, admin=ADMIN, team=TEAM)  # no signal: the parent's watch sees the change
            await until(serving(TEAM, NEW), "both workers to follow the file")
            for index, session in workers.items():
                assert await worker_of(session, url, admin) == index  # all on the connection to that worker

            async def counted_401() -> bool:
                text = await scrape(url, admin)
                return value(text, "gateway_requests_total", endpoint="models", status="401") == refused

            await until(counted_401, "every 401 counted")
            text = await scrape(url, admin)
            assert value(text, "gateway_requests_in_flight") == 0


async def test_dns_discovery_runs_in_the_parent_and_its_engines_reach_every_worker() -> None:
    with contextlib.ExitStack() as processes:
        zone, server = dns_server(processes)
        port = shared_port()
        for host in HOSTS:
            processes.callback(sim_process(host, port).stop)
        for host in HOSTS:
            wait_http(f"http://{host}:{port}/health")
        zone.records[NAME] = [HOSTS[0]]
        flags = ("--upstream", f"http://{NAME}:{port}", "--dns-server", server, "--dns-interval", "0.1")
        url, _gw = processes.enter_context(workers(*flags))
        async with AsyncExitStack() as sessions:
            each = await per_worker(sessions, url)

            def engines_are(*hosts: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    want = [f"{NAME}@{host}:{port}" for host in hosts]
                    return all([[u["name"] for u in (await status_of(s, url))["upstreams"]] == want
                                for s in each.values()])  # fmt: skip

                return check

            assert await engines_are(HOSTS[0])()  # known to each worker before it took a connection
            zone.records[NAME] = list(HOSTS)
            await until(engines_are(*HOSTS), "both workers to have the engine that joined")
            zone.records[NAME] = [HOSTS[1]]
            await until(engines_are(HOSTS[1]), "both workers to drop the engine that left")
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            for index, session in each.items():
                async with session.post(url + CHAT, json=body) as r:
                    assert r.status == 200
                assert await worker_of(session, url) == index
            text = await scrape(url)  # the parent's discovery, counted once: the name became its first address,
            assert value(text, "gateway_upstream_changes_total", change="added") == 2  # then the second joined
            assert value(text, "gateway_upstream_changes_total", change="removed") == 2  # and the first left
            assert value(text, "gateway_dns_resolutions_total", result="ok") >= 3
        state = await get_json(f"http://{HOSTS[1]}:{port}/admin/state")
        assert len(state["requests"]) == 2  # both at the engine that is left


async def test_an_engines_kv_room_counts_the_tokens_of_every_worker() -> None:
    # room 9,000 tokens (10,000 x --kv-headroom 0.9); a request of about 4,700 (4,500 prompt + 200): one fits, two
    # do not. The engine's own view is read once (at start, idle): only the gateway's count of tokens in flight decides.
    # No health round either, whose state carries every worker's tokens too: they reach worker 1 as they move.
    flags = ("--engine-load-interval", "60", "--health-interval", "60")
    with stack(*flags, sim_flags=("--kv-cache-tokens", "10000")) as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            looks, sends = await per_worker(sessions, url), await per_worker(sessions, url)

            async def routing(worker: int) -> Any:
                return (await status_of(looks[worker], url))["upstreams"][0]["routing"]

            async def post(worker: int) -> tuple[int, Any]:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 4500}], "max_tokens": 200}
                async with sends[worker].post(url + CHAT, json=body) as r:
                    return r.status, await r.json()

            await faults(sim, hang=True)
            first = asyncio.ensure_future(post(0))  # held by worker 0 at an engine that does not answer

            async def counted_by_worker_1() -> bool:
                return (await routing(1))["other_workers_tokens_in_flight"] > 0

            await until(counted_by_worker_1, "worker 1 to count worker 0's tokens")
            await faults(sim, hang=False)
            second = asyncio.ensure_future(post(1))

            async def second_waits() -> bool:
                status = await status_of(looks[1], url)
                return bool(status["routing"]["waiting_for_kv_room"] == 1)

            await until(second_waits, "worker 1's request to wait for KV room")
            assert [e["outcome"] for e in (await get_json(sim + "/admin/state"))["requests"]] == ["hang"]
            first.cancel()  # the client leaves: worker 0 frees the room, and worker 1 hears it
            with contextlib.suppress(asyncio.CancelledError):
                await first
            status, body = await second
            assert status == 200 and body["usage"]["completion_tokens"] == 200

            async def nothing_held() -> bool:
                views = [await routing(w) for w in (0, 1)]
                return all(v["gateway_tokens_in_flight"] == v["other_workers_tokens_in_flight"] == 0 for v in views)

            await until(nothing_held, "no tokens left in flight")


async def test_the_queue_is_fifo_across_workers() -> None:
    """One slot, held; requests queued through either worker in turn get it in the order they queued."""
    with stack("--max-concurrency", "1", "--max-queue", "8") as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            pairs = [await per_worker(sessions, url) for _ in range(4)]  # a connection to each worker, four times

            async def post(session: aiohttp.ClientSession, rid: str) -> int:
                body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
                async with session.post(url + CHAT, json=body, headers={"X-Request-Id": rid}) as r:
                    await r.read()
                    return r.status

            async def journal() -> list[Any]:
                return list((await get_json(sim + "/admin/state"))["requests"])

            await faults(sim, hang=True)
            held = asyncio.ensure_future(post(pairs[0][0], "held"))  # the slot taken by a request that hangs

            async def at_the_engine() -> bool:
                return [e["outcome"] for e in await journal()] == ["hang"]

            await until(at_the_engine, "the held request at the engine")
            await faults(sim, hang=False)
            order = [f"q{i}" for i in range(6)]
            queued = []
            for i, rid in enumerate(order):
                queued.append(asyncio.ensure_future(post(pairs[1 + i // 2][i % 2], rid)))  # workers 0, 1, 0, 1, ...

                async def in_the_queue(n: int = i + 1) -> bool:
                    return bool((await get_json(url + "/status"))["admission"]["queue_depth"] == n)

                await until(in_the_queue, f"{rid} queued")
            held.cancel()  # the client leaves: the slot goes to the queue's head, and so on in order
            with contextlib.suppress(asyncio.CancelledError):
                await held
            assert await asyncio.gather(*queued) == [200] * 6
            assert [e["request_id"] for e in await journal()] == ["held", *order]
            await counted(url, 6)
            status = await get_json(url + "/status")
            assert status["admission"]["in_flight"] == status["admission"]["queue_depth"] == 0
            assert sorted(w["admitted"] for w in status["workers"]) == [3, 4]  # the held one was worker 0's


async def test_every_worker_serves_the_metrics_port() -> None:
    admin_port = free_port()
    with stack("--metrics-port", str(admin_port)) as (_, url, gw):
        admin = f"http://127.0.0.1:{admin_port}"
        async with AsyncExitStack() as sessions:
            each = await per_worker(sessions, admin)  # /status there, answered by each worker in turn
            assert sorted(each) == [0, 1]
        results = await asyncio.gather(*(chat(url) for _ in range(10)))
        assert all(status == 200 for status, _ in results)
        await counted(admin, 10)
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            assert r.status == 404  # on the metrics port only
        assert [w["restarts"] for w in (await get_json(admin + "/status"))["workers"]] == [0, 0]
        gw.signal(signal.SIGTERM)
        assert gw.wait() == 0


@pytest.mark.parametrize("frees_after", [0.1, 0.5], ids=["during-the-call-back", "after-it"])
async def test_a_stalled_worker_does_not_hold_back_the_other_workers_admission(frees_after: float) -> None:
    """A worker that stops reading its socket (stopped, its loop blocked) while a call-back is out: the other
    worker's request that did not fit gets the slot that frees up (during the call-back's 0.25 s, or after it
    while the request waits in the queue), as it would without spare slots; and its queue wait counts the
    call-back's."""
    with stack("--max-concurrency", "8", "--max-queue", "4", "--queue-timeout", "3") as (sim, url, _gw):
        async with AsyncExitStack() as sessions:
            zeros = await connections_to(sessions, url, 0, 9)
            await until(lambda: all_connected(url), "both workers connected to the parent")
            stalled = (await get_json(url + "/status"))["workers"][1]["pid"]
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            held = await hung(sim, url, zeros[:8], body)
            await faults(sim, hang=False)
            os.kill(stalled, signal.SIGSTOP)
            ninth = asyncio.ensure_future(chat_on(zeros[8], url, body))
            try:
                await asyncio.sleep(frees_after)  # it reached the parent, which called the spare slots back
                held[0].cancel()  # a slot frees up: the ninth request's
                done, _ = await asyncio.wait([ninth], timeout=5)
                assert done, "the ninth request still waits with a slot free (or past --queue-timeout)"
                assert ninth.result() == 200
            finally:
                os.kill(stalled, signal.SIGCONT)
                for future in (*held, ninth):
                    future.cancel()
            # the eight before it were admitted at once; the ninth waited at least for the call-back to time out
            assert value(await scrape(url), "gateway_queue_wait_seconds_sum") >= 0.25


async def test_a_worker_that_dies_with_the_call_back_out_leaves_no_waiter_behind() -> None:
    """Worker 0's acquire does not fit and calls the spare slots back; worker 1 answers, worker 0 dies before it
    does: its acquire, deferred meanwhile, leaves with it (no place in the queue, no slot)."""
    with stack("--max-concurrency", "8", "--max-queue", "1", "--queue-timeout", "30") as (sim, url, gw):
        async with AsyncExitStack() as sessions:
            ones = await connections_to(sessions, url, 1, 9)
            zero = (await connections_to(sessions, url, 0, 1))[0]
            pid = (await status_of(zero, url))["workers"][0]["pid"]
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
            held = await hung(sim, url, ones[:8], body)
            gw.signal(signal.SIGSTOP)  # the parent reads worker 0's acquire only once worker 0 is stopped
            ninth = asyncio.ensure_future(chat_on(zero, url, body))
            try:
                await asyncio.sleep(0.3)
                os.kill(pid, signal.SIGSTOP)
            finally:
                gw.signal(signal.SIGCONT)
            await asyncio.sleep(0.3)  # the call-back out: worker 1 answers it, worker 0 (stopped) does not
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
            try:
                admission = (await status_of(ones[8], url))["admission"]
                assert admission["queue_depth"] == 0, admission
                assert admission["in_flight"] == 8, admission
            finally:
                for future in (*held, ninth):
                    future.cancel()
                await faults(sim, hang=False)
