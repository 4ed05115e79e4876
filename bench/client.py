"""Our async aiohttp load generator: SSE streams (TTFT, gaps, events/s), held streams, big bodies, scrapes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp

JSON = {"Content-Type": "application/json"}
_DONE = b"data: [DONE]\n\n"


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600),
        skip_auto_headers=("User-Agent",),
    )


@dataclass
class StreamStats:
    """What a set of streams measured; events are SSE content events (role chunk and [DONE] excluded)."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    events: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # between chunks carrying content events
    first: int = 0  # streams that have received their first content event
    errors: list[str] = field(default_factory=list)


async def one_stream(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stats: StreamStats,
    expect_events: int,
    deadline: float = float("inf"),
    on_first: Callable[[], None] | None = None,
) -> None:
    """One chat stream; events are counted as they arrive, only those before ``deadline``."""
    stats.started += 1
    t0 = perf_counter()
    seen = 0  # SSE events including the role chunk and [DONE]
    last = 0.0
    tail_nl = False
    done = False
    async with http.post(url, data=body, headers=JSON) as resp:
        if resp.status != 200:
            stats.failed += 1
            stats.errors.append(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            return
        async for chunk in resp.content.iter_any():
            now = perf_counter()
            n = chunk.count(b"\n\n") + (tail_nl and chunk[:1] == b"\n")
            tail_nl = chunk[-1:] == b"\n"
            if not n:
                continue
            before = seen
            seen += n
            if chunk.endswith(_DONE):
                done = True
            # content events: those after the role chunk (#1) and before [DONE]
            content = min(seen, expect_events + 1) - max(before, 1)
            if content <= 0:
                continue
            if now <= deadline:
                stats.events += content
            if last == 0.0:
                stats.ttft.append(now - t0)
                stats.first += 1
                if on_first is not None:
                    on_first()
            else:
                stats.gaps.append(now - last)
            last = now
    if done and seen == expect_events + 2:
        stats.completed += 1
    else:
        stats.failed += 1
        stats.errors.append(f"stream ended after {seen} events (done={done})")


async def stream_load(
    url: str, body: bytes, concurrency: int, duration: float, expect_events: int, stream_s: float = 0.0
) -> tuple[StreamStats, float]:
    """``concurrency`` workers open streams back to back for ``duration`` s; returns stats and the window.

    Worker i starts i/concurrency of a stream's length (``stream_s``) late: streams of equal length
    started together would end together and arrive again as one burst of ``concurrency`` requests, and
    the time to first token would measure how fast a proxy gets through a burst, not what it adds.
    """
    stats = StreamStats()
    async with session() as http:
        start = perf_counter()
        deadline = start + duration

        async def worker(i: int) -> None:
            await asyncio.sleep(i * stream_s / concurrency)
            while perf_counter() < deadline:
                try:
                    await one_stream(http, url, body, stats, expect_events, deadline)
                except (aiohttp.ClientError, OSError) as exc:
                    stats.failed += 1
                    stats.errors.append(repr(exc))

        tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
        await asyncio.wait(tasks, timeout=duration)
        window = perf_counter() - start
        for t in tasks:
            t.cancel()  # streams still open at the deadline are cut off; their events are counted
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats, window


async def hold_streams(
    url: str,
    body: bytes,
    count: int,
    expect_events: int,
    while_open: Callable[[], Awaitable[dict[str, Any]]],
    limit_s: float,
) -> tuple[StreamStats, dict[str, Any]]:
    """Open ``count`` streams at once; once every one has its first token, call ``while_open`` (the
    measurement); then let them all finish."""
    stats = StreamStats()
    all_open = asyncio.Event()

    def on_first() -> None:
        if stats.first >= count:
            all_open.set()

    async def guarded() -> None:
        try:
            await one_stream(http, url, body, stats, expect_events, on_first=on_first)
        except (aiohttp.ClientError, OSError) as exc:
            stats.failed += 1
            stats.errors.append(repr(exc))
            if stats.first + stats.failed >= count:
                all_open.set()

    measured: dict[str, Any] = {}
    async with session() as http:
        tasks = [asyncio.ensure_future(guarded()) for _ in range(count)]
        try:
            async with asyncio.timeout(limit_s):
                await all_open.wait()
                measured = await while_open()
                await asyncio.gather(*tasks)
        except TimeoutError:
            stats.errors.append(f"timed out after {limit_s:g} s")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return stats, measured


async def timed_post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    """Seconds from sending a request to its last response byte, and the status."""
    t0 = perf_counter()
    async with http.post(url, data=body, headers=JSON) as resp:
        await resp.read()
    return perf_counter() - t0, resp.status


async def scrape_loop(url: str, interval: float, duration: float) -> tuple[list[float], int, list[str]]:
    """GET ``url`` every ``interval`` s for ``duration`` s; latencies, body size, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    size = 0
    async with session() as http:
        end = perf_counter() + duration
        while perf_counter() < end:
            tick = perf_counter()
            try:
                async with http.get(url) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}")
                latencies.append(perf_counter() - tick)
                size = len(data)
            except (aiohttp.ClientError, OSError) as exc:
                errors.append(repr(exc))
            await asyncio.sleep(max(0.0, interval - (perf_counter() - tick)))
    return latencies, size, errors
