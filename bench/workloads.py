"""The workloads: each starts its engine and proxies, alternates configurations, returns rows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import client, wrk
from bench.env import Placement
from bench.procs import (
    MODEL,
    Proc,
    foreign_cpu_mark,
    foreign_cpu_since,
    start_floor,
    start_gateway,
    start_keyed_gateway,
    start_litellm,
    start_nginx,
    start_sim,
)
from bench.profile import Profiler

CONFIGS = ("direct", "nginx", "gateway")
# Workloads 1 and 2 also measure bench.floor, the least an aiohttp proxy adds; 1 to 3 LiteLLM's proxy
# when --litellm names it.
CHAT = "/v1/chat/completions"

# The engine answers at once, so the proxies, not the engine, are what is measured.
FAST_SIM: dict[str, float | int | str] = {
    "ttft": 0.0,
    "itl": 0.0,
    "prefill_tokens_per_s": 1e12,
    "max_num_seqs": 2048,
    "output_tokens": 16,
}
# Chinese prose for the 6 MB body: 3 UTF-8 bytes a character, about 2 characters a token.
CHINESE = (
    "长上下文模型可以一次读完整本书的内容，然后回答关于其中细节的问题。网关在引擎前面负责排队、限流和观测，"
    "它必须把每一个字节原样转发，不能成为瓶颈。"
)


@dataclass(frozen=True)
class Options:
    """How much of each workload to run."""

    quick: bool = False
    repeat: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    hold_streams: int = 1000
    big_body_chars: int = 2_000_000  # 6,000,000 bytes of UTF-8: ~1M tokens
    big_body_requests: int = 3
    scrape_interval: float = 0.1

    @classmethod
    def make(cls, quick: bool, repeat: int | None, duration: float | None) -> Options:
        if quick:
            return cls(
                quick=True,
                repeat=repeat or 1,
                duration=duration or 1.0,
                warmup=0.0,
                hold_streams=50,
                big_body_chars=200_000,
                big_body_requests=1,
            )
        return cls(repeat=repeat or 3, duration=duration or 5.0)


@dataclass
class Ctx:
    options: Options
    place: Placement
    nginx: str
    wrk: str
    workdir: Path
    profiler: Profiler | None = None
    litellm: str | None = None  # LiteLLM's command, for its optional row
    background: list[float] = dataclasses.field(default_factory=list)  # other processes' CPU, per run

    def configs(self, *extra: str) -> tuple[str, ...]:
        """The configurations a workload alternates: the three, ``extra`` ones, and LiteLLM when asked for."""
        return (*CONFIGS, *extra, *(("litellm",) if self.litellm else ()))


@dataclass
class Row:
    """One line of the results table: the three configurations' figures and the verdict."""

    workload: int
    metric: str
    unit: str
    direct: float | None
    nginx: float | None
    gateway: float | None
    value: float | None
    target: str
    ok: bool | None  # None: reported, no target

    @property
    def verdict(self) -> str:
        return "—" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Result:
    workload: int
    title: str
    params: dict[str, Any]
    runs: dict[str, list[dict[str, Any]]]
    rows: list[Row]
    seconds: float = 0.0
    profile: dict[str, Any] | None = None


def chat_body(max_tokens: int, stream: bool = False, content: str = "Hello, how are you today?") -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, ensure_ascii=False).encode()


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@contextlib.contextmanager
def services(
    ctx: Ctx,
    sim: dict[str, float | int | str],
    gateway_extra: tuple[str, ...] = (),
    proxies: bool = True,
    extra: tuple[str, ...] = (),
) -> Iterator[dict[str, Proc]]:
    """The engine, and (unless ``proxies`` is False) nginx and the gateway in front of it, and the
    ``extra`` configurations ("floor", "litellm") beside them."""
    with contextlib.ExitStack() as stack:
        procs: dict[str, Proc] = {}
        procs["direct"] = start_sim(ctx.workdir, ctx.place.sim, **sim)
        stack.callback(procs["direct"].stop)
        if proxies:
            procs["nginx"] = start_nginx(ctx.workdir, ctx.place.proxy, ctx.nginx, procs["direct"].url)
            stack.callback(procs["nginx"].stop)
            procs["gateway"] = start_gateway(ctx.workdir, ctx.place.proxy, procs["direct"].url, *gateway_extra)
            stack.callback(procs["gateway"].stop)
        for name in extra:
            if name == "floor":
                procs[name] = start_floor(ctx.workdir, ctx.place.proxy, procs["direct"].url)
            elif name == "keys":
                procs[name] = start_keyed_gateway(ctx.workdir, ctx.place.proxy, procs["direct"].url)
            elif name == "nolog":  # the gateway without its access log: what the default line per request costs
                procs[name] = start_gateway(
                    ctx.workdir, ctx.place.proxy, procs["direct"].url, "--access-log", "off", name="nolog"
                )
            else:
                assert name == "litellm" and ctx.litellm is not None
                procs[name] = start_litellm(ctx.workdir, ctx.place.proxy, ctx.litellm, procs["direct"].url)
            stack.callback(procs[name].stop)
        yield procs


@contextlib.contextmanager
def proxy(ctx: Ctx, name: str, upstream: str, gateway_extra: tuple[str, ...] = ()) -> Iterator[Proc]:
    """A fresh nginx or gateway (for memory figures that a previous run must not flatter)."""
    if name == "nginx":
        proc = start_nginx(ctx.workdir, ctx.place.proxy, ctx.nginx, upstream)
    else:
        proc = start_gateway(ctx.workdir, ctx.place.proxy, upstream, *gateway_extra)
    try:
        yield proc
    finally:
        proc.stop()


async def measure(ctx: Ctx, proc: Proc, work: Awaitable[Any]) -> tuple[Any, float | None, float]:
    """Run ``work``; also return the share of one core that ``proc`` used meanwhile (None for the
    engine), the cores' worth of CPU that other processes on the machine took meanwhile, and with
    --profile, sample the gateway's stacks meanwhile."""
    profiler = ctx.profiler if proc.name == "gateway" else None
    if profiler is not None:
        await profiler.start(proc.pid)
    try:
        mark = foreign_cpu_mark()
        cpu0, t0 = proc.cpu_seconds(), time.monotonic()
        out = await work
        cpu = None if proc.name == "sim" else (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        other = foreign_cpu_since(mark)
        ctx.background.append(other)
        return out, cpu, other
    finally:
        if profiler is not None:
            await profiler.stop()


def _three(by_config: dict[str, float]) -> tuple[float, float, float]:
    """The table's three columns: direct, nginx, gateway."""
    return by_config["direct"], by_config["nginx"], by_config["gateway"]


def alternate(repeat: int, configs: tuple[str, ...] = CONFIGS) -> Iterator[tuple[int, str]]:
    """A/B/C/A/B/C...: drifts in the machine hit every configuration alike."""
    for rep in range(repeat):
        for name in configs:
            yield rep, name


def _efficiency(runs: dict[str, list[dict[str, Any]]], rate: str) -> tuple[list[float], list[float]]:
    """Median CPU share (percent) of nginx and the gateway, and their work per CPU-second: where the
    engine, not the proxy, is the bottleneck, this still compares what each proxy costs."""
    cpu, per_cpu = [], []
    for name in ("nginx", "gateway"):
        cpu.append(100 * med([r["proxy_cpu"] for r in runs[name]]))
        per_cpu.append(med([r[rate] / r["proxy_cpu"] for r in runs[name] if r["proxy_cpu"]]))
    return cpu, per_cpu


# -- 1 and 2: fixed-size requests with wrk ------------------------------------------------------------


async def _wrk_runs(ctx: Ctx, connections: int) -> dict[str, list[dict[str, Any]]]:
    o = ctx.options
    script = wrk.write_script(ctx.workdir / "chat.lua", chat_body(16))
    configs = ctx.configs("floor", "keys", "nolog")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with services(ctx, FAST_SIM, extra=configs[len(CONFIGS) :]) as procs:
        if o.warmup:
            for name in configs:
                await wrk.run(ctx.wrk, procs[name].url + CHAT, script, connections, o.warmup, ctx.place.loadgen)
        for _, name in alternate(o.repeat, configs):
            url = procs[name].url + CHAT
            work = wrk.run(ctx.wrk, url, script, connections, o.duration, ctx.place.loadgen)
            run, cpu, other = await measure(ctx, procs[name], work)
            run["proxy_cpu"], run["other_cpu"] = cpu, other
            runs[name].append(run)
    return runs


async def latency_c1(ctx: Ctx) -> Result:
    runs = await _wrk_runs(ctx, 1)
    p50 = {n: med([r["p50_ms"] for r in runs[n]]) for n in runs}
    p99 = {n: med([r["p99_ms"] for r in runs[n]]) for n in runs}
    added50 = p50["gateway"] - p50["direct"]
    added99 = p99["gateway"] - p99["direct"]
    rows = [
        Row(1, "latency p50, c=1 (value: gateway added)", "ms", *_three(p50), added50, "≤ 0.3 ms", added50 <= 0.3),
        Row(1, "latency p99, c=1 (value: gateway added)", "ms", *_three(p99), added99, "", None),
        Row(1, "nginx added p50 / p99, c=1 (reference)", "ms", None, None, None,
            p50["nginx"] - p50["direct"], f"p99 +{p99['nginx'] - p99['direct']:.3f} ms", None),
        Row(1, "floor added p50 / p99, c=1 (aiohttp + engine client, no feature)", "ms", None, None, None,
            p50["floor"] - p50["direct"], f"p99 +{p99['floor'] - p99['direct']:.3f} ms", None),
        Row(1, "gateway added over the floor, p50, c=1 (its features)", "ms", None, None, None,
            p50["gateway"] - p50["floor"], "", None),
        Row(1, "keys and rate limits added over the gateway, p50 / p99, c=1", "ms", None, None, None,
            p50["keys"] - p50["gateway"], f"p99 {p99['keys'] - p99['gateway']:+.3f} ms", None),
        Row(1, "access log (default) added over --access-log off, p50 / p99, c=1", "ms", None, None, None,
            p50["gateway"] - p50["nolog"], f"p99 {p99['gateway'] - p99['nolog']:+.3f} ms", None),
    ]  # fmt: skip
    if "litellm" in runs:
        added99 = f"p99 +{p99['litellm'] - p99['direct']:.3f} ms"
        rows.append(Row(1, "LiteLLM added p50 / p99, c=1 (reference)", "ms", None, None, None,
                        p50["litellm"] - p50["direct"], added99, None))  # fmt: skip
    return Result(1, "small chat completion, not streamed, c=1", {"body": chat_body(16).decode()}, runs, rows)


async def throughput_c64(ctx: Ctx) -> Result:
    runs = await _wrk_runs(ctx, 64)
    rps = {n: med([r["rps"] for r in runs[n]]) for n in runs}
    ratio = rps["gateway"] / rps["nginx"]
    cpu, per_cpu = _efficiency(runs, "rps")
    rows = [
        Row(2, "requests/s, c=64 (value: gateway / nginx)", "req/s", *_three(rps), ratio, "≥ 0.6 × nginx",
            ratio >= 0.6),
        Row(2, "proxy CPU, c=64 (share of its core)", "%", None, *cpu, None, "", None),
        Row(2, "requests per proxy CPU-second (value: gateway / nginx)", "req/s", None, *per_cpu,
            per_cpu[1] / per_cpu[0], "", None),
        Row(2, "floor requests/s, c=64 (value: gateway / floor)", "req/s", None, None, None,
            rps["gateway"] / rps["floor"], f"floor {rps['floor']:,.0f} req/s", None),
        Row(2, "with keys and rate limits, requests/s, c=64 (value: keyed gateway / gateway)", "req/s", None, None,
            None, rps["keys"] / rps["gateway"], f"keys {rps['keys']:,.0f} req/s", None),
        Row(2, "access log on (default) vs off, requests/s, c=64 (value: gateway / gateway without it)", "req/s",
            None, None, None, rps["gateway"] / rps["nolog"], f"off {rps['nolog']:,.0f} req/s", None),
    ]  # fmt: skip
    if "litellm" in runs:
        rows.append(Row(2, "LiteLLM requests/s, c=64 (value: gateway / LiteLLM)", "req/s", None, None, None,
                        rps["gateway"] / rps["litellm"], f"LiteLLM {rps['litellm']:,.0f} req/s", None))  # fmt: skip
    return Result(2, "small chat completion, not streamed, c=64", {"connections": 64}, runs, rows)


# -- 3: streams --------------------------------------------------------------------------------------

STREAM_TOKENS = 256
STREAM_SIM = {**FAST_SIM, "itl": 0.002}
STREAM_S = STREAM_TOKENS * 0.002  # a stream's length at that pace: the workers' starts are spread over it


async def streams_c64(ctx: Ctx) -> Result:
    o = ctx.options
    body = chat_body(STREAM_TOKENS, stream=True)
    configs = ctx.configs()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with services(ctx, STREAM_SIM, extra=configs[len(CONFIGS) :]) as procs:
        if o.warmup:
            for name in configs:
                await client.stream_load(procs[name].url + CHAT, body, 64, o.warmup, STREAM_TOKENS, STREAM_S)
        for _, name in alternate(o.repeat, configs):
            work = client.stream_load(procs[name].url + CHAT, body, 64, o.duration, STREAM_TOKENS, STREAM_S)
            (stats, window), cpu, other = await measure(ctx, procs[name], work)
            runs[name].append(
                {
                    "events_per_s": stats.events / window,
                    "events": stats.events,
                    "window_s": window,
                    "streams_started": stats.started,
                    "streams_completed": stats.completed,
                    "ttft_p50_ms": med(stats.ttft) * 1000,
                    "ttft_p99_ms": pct(stats.ttft, 99) * 1000,
                    "gap_p50_ms": med(stats.gaps) * 1000,
                    "gap_p99_ms": pct(stats.gaps, 99) * 1000,
                    "errors": stats.errors[:5],
                    "proxy_cpu": cpu,
                    "other_cpu": other,
                }
            )
    eps = {n: med([r["events_per_s"] for r in runs[n]]) for n in runs}
    ttft = {n: med([r["ttft_p50_ms"] for r in runs[n]]) for n in runs}
    gap = {n: med([r["gap_p99_ms"] for r in runs[n]]) for n in runs}
    ratio = eps["gateway"] / eps["nginx"]
    added = ttft["gateway"] - ttft["direct"]
    cpu, per_cpu = _efficiency(runs, "events_per_s")
    rows = [
        Row(3, "SSE events/s, c=64 (value: gateway / nginx)", "ev/s", *_three(eps), ratio, "≥ 0.9 × nginx",
            ratio >= 0.9),
        Row(3, "TTFT p50, c=64 (value: gateway added)", "ms", *_three(ttft), added, "≤ 1 ms", added <= 1.0),
        Row(3, "inter-chunk gap p99, c=64 (value: gateway added)", "ms", *_three(gap),
            gap["gateway"] - gap["direct"], "", None),
        Row(3, "proxy CPU, c=64 (share of its core)", "%", None, *cpu, None, "", None),
        Row(3, "events per proxy CPU-second (value: gateway / nginx)", "ev/s", None, *per_cpu,
            per_cpu[1] / per_cpu[0], "≥ 0.8 × nginx (issue 14)", per_cpu[1] / per_cpu[0] >= 0.8),
    ]  # fmt: skip
    if "litellm" in runs:
        rows.append(Row(3, "LiteLLM SSE events/s, c=64 (value: gateway / LiteLLM)", "ev/s", None, None, None,
                        eps["gateway"] / eps["litellm"],
                        f"LiteLLM {eps['litellm']:,.0f} ev/s, TTFT p50 +{ttft['litellm'] - ttft['direct']:.1f} ms",
                        None))  # fmt: skip
    params = {"concurrency": 64, "tokens": STREAM_TOKENS, "sim": STREAM_SIM}
    return Result(3, f"{STREAM_TOKENS}-token streams, c=64", params, runs, rows)


# -- 4: 1,000 streams held open ----------------------------------------------------------------------


async def held_streams(ctx: Ctx) -> Result:
    o = ctx.options
    n = o.hold_streams
    tokens = 8 if o.quick else 12
    sim = {**FAST_SIM, "itl": 0.25 if o.quick else 1.0, "max_num_seqs": max(2048, 2 * n)}
    body = chat_body(tokens, stream=True)
    warm = chat_body(2, stream=True)
    configs = ("nginx", "gateway")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with services(ctx, sim, proxies=False) as procs:
        upstream = procs["direct"].url
        for _, name in alternate(o.repeat, configs):
            with proxy(ctx, name, upstream) as p:
                url = p.url + CHAT
                await warm_streams(url, warm, 20)
                await asyncio.sleep(0.5)
                base_rss, base_fds = p.rss_kib(), p.fds()

                async def sample(p: Proc = p) -> dict[str, Any]:
                    rss, fds = [], []
                    for _ in range(5):
                        rss.append(p.rss_kib())
                        fds.append(p.fds())
                        await asyncio.sleep(0.2)
                    return {"rss_kib": max(rss), "fds": max(fds)}

                work = client.hold_streams(url, body, n, tokens, sample, limit_s=120)
                (stats, peak), _, other = await measure(ctx, p, work)
                rss_kib = peak.get("rss_kib", base_rss)
                runs[name].append(
                    {
                        "streams": n,
                        "completed": stats.completed,
                        "failed": stats.failed,
                        "base_rss_kib": base_rss,
                        "peak_rss_kib": rss_kib,
                        "rss_per_stream_kib": (rss_kib - base_rss) / n,
                        "base_fds": base_fds,
                        "peak_fds": peak.get("fds"),
                        "fds_per_stream": (peak.get("fds", base_fds) - base_fds) / n,
                        "ttft_p50_ms": med(stats.ttft) * 1000,
                        "ttft_max_ms": max(stats.ttft, default=float("nan")) * 1000,
                        "errors": stats.errors[:5],
                        "other_cpu": other,
                    }
                )
    per = {n_: med([r["rss_per_stream_kib"] for r in runs[n_]]) for n_ in configs}
    fds = {n_: med([r["peak_fds"] or 0 for r in runs[n_]]) for n_ in configs}
    done = min(r["completed"] for r in runs["gateway"])
    rows = [
        Row(4, f"RSS per open stream, {n} held", "KiB", None, per["nginx"], per["gateway"], per["gateway"],
            "≤ 64 KiB", per["gateway"] <= 64),
        Row(4, f"streams completed (worst run), {n} held", "streams", None,
            min(r["completed"] for r in runs["nginx"]), done, done, f"{n}/{n}", done == n),
        Row(4, f"open fds at peak, {n} held", "fds", None, fds["nginx"], fds["gateway"], fds["gateway"], "", None),
    ]  # fmt: skip
    params = {"streams": n, "tokens": tokens, "sim": sim}
    return Result(4, f"{n} streams held open at once", params, runs, rows)


async def warm_streams(url: str, body: bytes, count: int) -> None:
    """A few short 2-token streams to warm a fresh proxy before its baseline is read."""
    async with client.session() as http:
        stats = client.StreamStats()
        await asyncio.gather(
            *(client.one_stream(http, url, body, stats, 2) for _ in range(count)), return_exceptions=True
        )


# -- 5: one 6 MB body --------------------------------------------------------------------------------


def big_body(chars: int) -> bytes:
    text = (CHINESE * (chars // len(CHINESE) + 1))[:chars]
    return chat_body(16, content=text)


async def _big_requests(
    http: aiohttp.ClientSession, p: Proc, body: bytes, count: int
) -> tuple[list[float], list[int | None], list[int]]:
    """``count`` requests one after the other: latency (ms), the proxy's peak RSS growth (bytes), status."""
    latencies: list[float] = []
    growth: list[int | None] = []
    statuses: list[int] = []
    for _ in range(count):
        measured = p.name != "sim"
        reset = p.reset_hwm() if measured else False
        before = p.rss_kib() if measured else 0
        seconds, status = await client.timed_post(http, p.url + CHAT, body)
        latencies.append(seconds * 1000)
        statuses.append(status)
        if measured:
            growth.append((p.hwm_kib() - before) * 1024 if reset else None)
    return latencies, growth, statuses


async def big_body_latency(ctx: Ctx) -> Result:
    o = ctx.options
    body = big_body(o.big_body_chars)
    # a KV cache that holds the ~1M-token prompt: the gateway refuses (400) what no engine's cache can hold
    sim = {**FAST_SIM, "max_model_len": 4 * 1048576, "kv_cache_tokens": 4 * 1048576}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with services(ctx, sim) as procs:
        async with client.session() as http:
            for name in CONFIGS:  # warm every path, the big body included
                await client.timed_post(http, procs[name].url + CHAT, chat_body(4))
                if not o.quick:
                    await client.timed_post(http, procs[name].url + CHAT, body)
            for _, name in alternate(o.repeat):
                (latencies, growth, statuses), _, other = await measure(
                    ctx, procs[name], _big_requests(http, procs[name], body, o.big_body_requests)
                )
                runs[name].append(
                    {
                        "latency_ms": med(latencies),
                        "latencies_ms": latencies,
                        "statuses": statuses,
                        "peak_rss_growth_bytes": max((g for g in growth if g is not None), default=None),
                        "other_cpu": other,
                    }
                )
    lat = {n: med([r["latency_ms"] for r in runs[n]]) for n in CONFIGS}
    added = lat["gateway"] - lat["direct"]
    growth = {
        n: max((r["peak_rss_growth_bytes"] or 0 for r in runs[n]), default=0) / len(body) for n in ("nginx", "gateway")
    }
    refused = sorted({f"{n} {s}" for n in CONFIGS for r in runs[n] for s in r["statuses"] if s != 200})
    ok = not refused
    mb = len(body) / 1e6
    answered = "" if ok else f"; not answered 200: {', '.join(refused)}"
    rows = [
        Row(5, f"latency, {mb:.1f} MB chat body (value: gateway added)", "ms", *lat.values(), added,
            "≤ 30 ms" + answered, added <= 30 and ok),
        Row(5, f"peak RSS growth / body size, {mb:.1f} MB body", "× body", None, growth["nginx"],
            growth["gateway"], growth["gateway"], "≤ 3 × body" + answered, growth["gateway"] <= 3 and ok),
    ]  # fmt: skip
    params = {"body_bytes": len(body), "characters": o.big_body_chars, "all_200": ok, "sim": sim}
    return Result(5, f"one {mb:.1f} MB chat body (Chinese, ~{o.big_body_chars // 2:,} tokens)", params, runs, rows)


# -- 6: /metrics under traffic -----------------------------------------------------------------------

SCRAPE_SIM = {**FAST_SIM, "itl": 0.02}
TRAFFIC_STREAMS = 32
TRAFFIC_TOKENS = 64


async def metrics_scrape(ctx: Ctx) -> Result:
    o = ctx.options
    configs = ("direct", "gateway")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    traffic = chat_body(TRAFFIC_TOKENS, stream=True)
    # every scrape fetches the engine's /metrics afresh, as a 15 s Prometheus scrape interval would
    with services(ctx, SCRAPE_SIM, ("--engine-metrics-max-age", "0")) as procs:
        gw = procs["gateway"]
        await client.stream_load(gw.url + CHAT, traffic, 4, 0.5, TRAFFIC_TOKENS)  # fill the histograms
        for _, name in alternate(o.repeat, configs):
            load = asyncio.ensure_future(
                client.stream_load(gw.url + CHAT, traffic, TRAFFIC_STREAMS, o.duration + 1.0, TRAFFIC_TOKENS)
            )
            await asyncio.sleep(0.5)  # traffic flowing before the first scrape
            work = client.scrape_loop(procs[name].url + "/metrics", o.scrape_interval, o.duration)
            (latencies, size, errors), cpu, other = await measure(ctx, procs[name], work)
            stats, window = await load
            runs[name].append(
                {
                    "scrapes": len(latencies),
                    "p50_ms": med(latencies) * 1000,
                    "p99_ms": pct(latencies, 99) * 1000,
                    "max_ms": max(latencies, default=float("nan")) * 1000,
                    "body_bytes": size,
                    "errors": errors[:5],
                    "traffic_events_per_s": stats.events / window,
                    "scraped_cpu": cpu,
                    "other_cpu": other,
                }
            )
    p99 = {n: med([r["p99_ms"] for r in runs[n]]) for n in configs}
    ok = not any(r["errors"] for n in configs for r in runs[n])
    rows = [
        Row(6, "/metrics scrape p99 under traffic", "ms", p99["direct"], None, p99["gateway"], p99["gateway"],
            "≤ 25 ms", p99["gateway"] <= 25 and ok),
    ]  # fmt: skip
    params = {
        "scrape_interval_s": o.scrape_interval,
        "traffic": f"{TRAFFIC_STREAMS} streams of {TRAFFIC_TOKENS} tokens through the gateway",
        "gateway_flags": ["--engine-metrics-max-age", "0"],
        "sim": SCRAPE_SIM,
    }
    return Result(6, "/metrics scrape latency through the gateway while traffic flows", params, runs, rows)


# -- 7: reliability (bench/soak.py) ---------------------------------------------------------------------


async def reliability(ctx: Ctx) -> Result:
    from bench.soak import reliability as run  # it builds on this module's helpers

    return await run(ctx)


async def failover(ctx: Ctx) -> Result:
    from bench.routing import failover as run  # it builds on this module's helpers

    return await run(ctx)


async def routing_cost(ctx: Ctx) -> Result:
    from bench.routing import routing_cost as run

    return await run(ctx)


async def scaling(ctx: Ctx) -> Result:
    from bench.scaling import workers  # it builds on this module's helpers

    return await workers(ctx)


WORKLOADS: dict[int, Callable[[Ctx], Awaitable[Result]]] = {
    1: latency_c1,
    2: throughput_c64,
    3: streams_c64,
    4: held_streams,
    5: big_body_latency,
    6: metrics_scrape,
    7: reliability,
    8: failover,
    9: routing_cost,
    10: scaling,
}
