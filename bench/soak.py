"""Workload 7, reliability: a soak of 1,000 streams, 5,000 idle connections, a slow reader, an engine restart."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp

from bench import client
from bench.procs import Proc, start_gateway, start_sim, wait_http
from bench.workloads import CHAT, FAST_SIM, Ctx, Result, Row, chat_body, med, pct

SOAK_SIM = {**FAST_SIM, "itl": 0.1, "max_num_seqs": 4096}
SOAK_TOKENS = 50  # 5 s a stream


async def _sampled(p: Proc, work: Awaitable[Any], every: float = 0.5) -> tuple[Any, dict[str, int]]:
    """Run ``work`` while sampling the process's RSS and fds: their peaks."""
    peak = {"rss_kib": p.rss_kib(), "fds": p.fds()}
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=every)
        peak["rss_kib"] = max(peak["rss_kib"], p.rss_kib())
        peak["fds"] = max(peak["fds"], p.fds())
    return task.result(), peak


async def _in_flight(p: Proc) -> float:
    async with aiohttp.ClientSession() as s, s.get(p.url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gateway_requests_in_flight "))


async def soak(gw: Proc, streams: int, duration: float, tokens: int) -> dict[str, Any]:
    """``streams`` streams at once, back to back, for ``duration`` s: errors, RSS and fds before/peak/after."""
    before = {"rss_kib": gw.rss_kib(), "fds": gw.fds()}
    body = chat_body(tokens, stream=True)
    work = client.stream_load(gw.url + CHAT, body, streams, duration, tokens, tokens * float(SOAK_SIM["itl"]))
    (stats, window), peak = await _sampled(gw, work)
    await asyncio.sleep(5.0)  # the cut-off streams' handlers return, idle engine connections expire (4 s)
    return {
        "streams": streams, "duration_s": window, "completed": stats.completed, "failed": stats.failed,
        "errors": stats.errors[:5], "before": before, "peak": peak,
        "after": {"rss_kib": gw.rss_kib(), "fds": gw.fds()}, "in_flight_after": await _in_flight(gw),
    }  # fmt: skip


async def _latencies(url: str, count: int) -> list[float]:
    body = chat_body(4)
    out = []
    async with client.session() as http:
        for _ in range(count):
            seconds, status = await client.timed_post(http, url + CHAT, body)
            if status == 200:
                out.append(seconds * 1000)
    return out


async def idle_connections(gw: Proc, count: int) -> dict[str, Any]:
    """``count`` keep-alive connections, each after one request, held idle: RSS per connection, and the
    latency of new clients meanwhile against before."""
    quiet = await _latencies(gw.url, 100)
    host, port = gw.url.removeprefix("http://").split(":")
    base = gw.rss_kib()
    held: list[asyncio.StreamWriter] = []
    refused = 0
    try:
        for _ in range(count):
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET /health/live HTTP/1.1\r\nHost: bench\r\n\r\n")
                await reader.readuntil(b"\r\n\r\n")
                held.append(writer)
            except (OSError, asyncio.IncompleteReadError):
                refused += 1
        await asyncio.sleep(0.5)
        rss = gw.rss_kib()
        busy = await _latencies(gw.url, 100)
        fds = gw.fds()
    finally:
        for writer in held:
            writer.close()
    return {
        "connections": len(held), "refused": refused, "base_rss_kib": base, "rss_kib": rss, "fds": fds,
        "rss_per_connection_kib": (rss - base) / max(len(held), 1),
        "quiet_p50_ms": med(quiet), "quiet_p99_ms": pct(quiet, 99),
        "held_p50_ms": med(busy), "held_p99_ms": pct(busy, 99),
    }  # fmt: skip


async def slow_reader(gw: Proc, tokens: int, pause: float) -> dict[str, Any]:
    """One long stream whose client stops reading for ``pause`` s: how much the gateway holds for it."""
    host, port = gw.url.removeprefix("http://").split(":")
    body = chat_body(tokens, stream=True)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's kernel takes little of it
    sock.setblocking(False)
    base = gw.rss_kib()
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    head = f"POST {CHAT} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await reader.readuntil(b"\r\n\r\n")
    peak = base
    deadline = time.monotonic() + pause
    while time.monotonic() < deadline:  # not reading
        await asyncio.sleep(0.1)
        peak = max(peak, gw.rss_kib())
    rest = await reader.read()  # to the end: the request asked to close after the answer
    writer.close()
    return {"tokens": tokens, "pause_s": pause, "base_rss_kib": base, "peak_rss_kib": peak,
            "growth_kib": peak - base, "done": b"data: [DONE]" in rest[-200:]}  # fmt: skip


async def _read_stream(http: aiohttp.ClientSession, url: str, body: bytes) -> str:
    """One stream's outcome: completed, error_event (an error event and [DONE]), http_NNN, or the exception."""
    try:
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                return f"http_{resp.status}"
            data = await resp.read()
    except (aiohttp.ClientError, OSError) as exc:
        return type(exc).__name__
    if not data.endswith(b"data: [DONE]\n\n"):
        return "cut_without_done"
    return "error_event" if b'data: {"error"' in data else "completed"


async def engine_restart(ctx: Ctx, gw: Proc, sim: Proc, streams: int) -> tuple[dict[str, Any], Proc]:
    """``streams`` streams running when the engine is killed (SIGKILL) and started again on its port:
    what each client got, and the seconds until a new request succeeds."""
    body = chat_body(100, stream=True)
    async with client.session() as http:
        tasks = [asyncio.ensure_future(_read_stream(http, gw.url + CHAT, body)) for _ in range(streams)]
        await asyncio.sleep(1.0)  # every stream running
        sim.proc.kill()
        sim.proc.wait()
        killed = time.monotonic()
        outcomes = await asyncio.gather(*tasks)
        restarted = Proc("sim", list(sim.proc.args), ctx.place.sim, ctx.workdir / "sim-restarted.log")
        restarted.url = sim.url
        wait_http(sim.url + "/health", restarted.proc)
        recovered = float("nan")
        while time.monotonic() - killed < 60:
            async with http.post(gw.url + CHAT, data=chat_body(2), headers={"Content-Type": "application/json"}) as r:
                if r.status == 200:
                    recovered = time.monotonic() - killed
                    break
            await asyncio.sleep(0.1)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"streams": streams, "outcomes": counts, "recovered_s": recovered}, restarted


async def reliability(ctx: Ctx) -> Result:
    o = ctx.options
    streams, duration, tokens = (50, 3.0, 10) if o.quick else (1000, 60.0, SOAK_TOKENS)
    idle, slow_tokens, pause, restart = (200, 2000, 1.0, 5) if o.quick else (5000, 20000, 3.0, 20)
    runs: dict[str, list[dict[str, Any]]] = {"gateway": []}
    run: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        # idle connections and the slow reader against an engine that answers at once: the gateway is measured
        fast = start_sim(ctx.workdir, ctx.place.sim, **FAST_SIM)
        stack.callback(fast.stop)
        gw = start_gateway(ctx.workdir, ctx.place.proxy, fast.url, "--max-connections", str(2 * idle))
        stack.callback(gw.stop)
        run["idle"] = await idle_connections(gw, idle)
        run["slow_reader"] = await slow_reader(gw, slow_tokens, pause)
    sim = start_sim(ctx.workdir, ctx.place.sim, **SOAK_SIM)
    try:
        gw = start_gateway(ctx.workdir, ctx.place.proxy, sim.url, "--max-connections", str(4 * streams))
        try:
            run["soak"] = await soak(gw, streams, duration, tokens)
            run["restart"], sim = await engine_restart(ctx, gw, sim, restart)
        finally:
            gw.stop()
    finally:
        sim.stop()
    runs["gateway"].append(run)
    s, i, r, e = run["soak"], run["idle"], run["slow_reader"], run["restart"]
    grew = s["after"]["fds"] - s["before"]["fds"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(e["outcomes"].items()))
    rows = [
        Row(7, f"soak: {streams} streams for {duration:g} s, failed", "streams", None, None, s["failed"],
            s["failed"], "0", s["failed"] == 0),
        Row(7, f"soak: RSS before / peak / after ({s['completed']:,} streams done)", "KiB", None, None,
            s["peak"]["rss_kib"], s["after"]["rss_kib"], f"before {s['before']['rss_kib']:,}", None),
        Row(7, "soak: open fds after minus before; in flight after", "fds", None, None, s["peak"]["fds"], grew,
            f"in flight {s['in_flight_after']:g}", grew <= 2 and s["in_flight_after"] == 0),
        Row(7, f"RSS per idle keep-alive connection, {i['connections']:,} held", "KiB", None, None,
            i["rss_kib"], i["rss_per_connection_kib"], f"refused {i['refused']}", None),
        Row(7, "new client p99 while they are held (value: quiet p99)", "ms", None, None, i["held_p99_ms"],
            i["quiet_p99_ms"], f"p50 {i['held_p50_ms']:.2f} vs {i['quiet_p50_ms']:.2f}", None),
        Row(7, f"slow reader: gateway RSS growth, {slow_tokens:,}-token stream unread {pause:g} s", "KiB", None,
            None, r["peak_rss_kib"], r["growth_kib"], f"[DONE] after: {r['done']}", r["done"]),
        Row(7, f"engine killed under {restart} streams: time to the next 200", "ms", None, None, None,
            e["recovered_s"] * 1000, outcomes, e["outcomes"].get("cut_without_done", 0) == 0),
    ]  # fmt: skip
    params = {"soak_sim": SOAK_SIM, "soak_tokens": tokens, "idle": idle, "slow_tokens": slow_tokens}
    return Result(7, "reliability: soak, idle connections, a slow reader, an engine restart", params, runs, rows)
