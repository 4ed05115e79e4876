"""Workloads 8 and 9, several engines: one of three killed under load, and what routing among three costs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from bench import client, wrk
from bench.procs import MODEL, Proc, start_engine, start_gateway, start_sim
from bench.workloads import CHAT, FAST_SIM, Ctx, Result, Row, alternate, chat_body, measure, med

# -- 8: one engine of three killed (SIGKILL) under load --------------------------------------------------

# three engines of different speeds and KV sizes; each generates at most 8 requests at once and queues the rest
FAILOVER_SIMS: tuple[dict[str, float | int | str], ...] = tuple(
    {**FAST_SIM, "max_num_seqs": 8, "ttft": ttft, "itl": itl, "kv_cache_tokens": kv}
    for ttft, itl, kv in ((0.02, 0.004, 600_000), (0.04, 0.008, 300_000), (0.08, 0.016, 150_000))
)
FAILOVER_TOKENS = 32
FAILOVER_CLIENTS = 64  # at once, back to back, every other request streamed
FAILOVER_SLOTS = 32  # --max-concurrency: the other clients' requests wait in the gateway's queue
KILL_AT = 0.4  # share of the run after which the fastest engine is killed


@dataclass
class Outcome:
    """One client request: when it started, got its answer's first byte (its head) and ended, and how."""

    request_id: str
    stream: bool
    start: float
    first: float | None = None
    end: float = 0.0
    ok: bool = False
    detail: str = ""


async def _one(http: aiohttp.ClientSession, url: str, stream: bool, request_id: str) -> Outcome:
    out = Outcome(request_id, stream, time.monotonic())
    body = chat_body(FAILOVER_TOKENS, stream=stream)
    headers = {**client.JSON, "X-Request-Id": request_id}
    try:
        async with http.post(url, data=body, headers=headers) as resp:
            out.first = time.monotonic()
            data = await resp.read()
        if resp.status != 200:
            out.detail = f"HTTP {resp.status}: {data[:160]!r}"
        elif stream and not data.endswith(b"data: [DONE]\n\n"):
            out.detail = "stream cut without [DONE]"
        elif stream and b'data: {"error"' in data:
            out.detail = "stream ended by an error event"
        else:
            out.ok = stream or b'"choices"' in data
            out.detail = "" if out.ok else f"no choices: {data[:160]!r}"
    except (aiohttp.ClientError, OSError) as exc:
        out.detail = repr(exc)
    out.end = time.monotonic()
    return out


async def _traffic(
    url: str, clients: int, duration: float, kill: Any, kill_after: float
) -> tuple[list[Outcome], float]:
    """``clients`` workers send requests back to back for ``duration`` s, streamed and not in turn; ``kill``
    runs after ``kill_after`` s.  Returns every request's outcome and when the kill happened."""
    outcomes: list[Outcome] = []
    ids = itertools.count()
    async with client.session() as http:
        deadline = time.monotonic() + duration

        async def worker(i: int) -> None:
            for n in itertools.count(i):
                if time.monotonic() >= deadline:
                    return
                outcomes.append(await _one(http, url, n % 2 == 0, f"bench-failover-{next(ids)}"))

        tasks = [asyncio.ensure_future(worker(i)) for i in range(clients)]
        await asyncio.sleep(kill_after)
        kill()
        killed = time.monotonic()
        await asyncio.gather(*tasks)
    return outcomes, killed


def _access_log(proc: Proc) -> dict[str, dict[str, Any]]:
    """The gateway's JSON access log lines by request id."""
    out = {}
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                out[str(entry.get("request_id"))] = entry
    return out


async def _retries(url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gateway_retries_total{"))


async def _failover_round(ctx: Ctx) -> dict[str, Any]:
    o = ctx.options
    duration = 2.0 if o.quick else 2 * o.duration
    with contextlib.ExitStack() as stack:
        sims = []
        for sim in FAILOVER_SIMS:
            sims.append(start_sim(ctx.workdir, ctx.place.sim, **sim))
            stack.callback(sims[-1].stop)
        more = [arg for s in sims[1:] for arg in ("--upstream", s.url)]
        gw = start_gateway(ctx.workdir, ctx.place.proxy, sims[0].url, *more, "--max-concurrency", str(FAILOVER_SLOTS),
                           "--access-log", "json", name="failover")  # fmt: skip
        stack.callback(gw.stop)
        victim = sims[0]  # the fastest: it carries the most requests

        def kill() -> None:
            victim.proc.kill()
            victim.proc.wait()

        outcomes, killed = await _traffic(gw.url + CHAT, FAILOVER_CLIENTS, duration, kill, KILL_AT * duration)
        retries = await _retries(gw.url)
        window = max(x.end for x in outcomes) - min(x.start for x in outcomes)
    log = _access_log(gw)
    at_kill = [x for x in outcomes if x.start <= killed < x.end]
    before_byte = [x for x in outcomes if not x.ok and (x.first is None or x.first > killed)]
    cut = [x for x in outcomes if not x.ok and x.first is not None and x.first <= killed]

    def forwarded(x: Outcome) -> float:
        """When the gateway forwarded it: its arrival (the client's start, on loopback) + its queue wait."""
        return x.start + float(log.get(x.request_id, {}).get("queue_wait") or 0.0)

    queued = [x for x in at_kill if forwarded(x) > killed]  # waiting in the gateway's queue at the kill
    unsent = [x for x in outcomes if forwarded(x) > killed]  # queued then, or arriving after

    def described(xs: list[Outcome]) -> list[dict[str, Any]]:
        return [{**asdict(x), "upstream": log.get(x.request_id, {}).get("upstream"),
                 "error_type": log.get(x.request_id, {}).get("error_type")} for x in xs[:20]]  # fmt: skip

    return {
        "requests": len(outcomes),
        "completed": sum(x.ok for x in outcomes),
        "rps": len(outcomes) / window,
        "in_flight_at_kill": len(at_kill),
        "no_byte_at_kill": sum(1 for x in outcomes if x.end > killed and (x.first is None or x.first > killed)),
        "failed_before_first_byte": len(before_byte),
        "failed_before_first_byte_at_victim": sum(
            1 for x in before_byte if log.get(x.request_id, {}).get("upstream") == victim.url
        ),
        "cut_mid_stream": len(cut),
        "queued_at_kill": len(queued),
        "not_forwarded_at_kill": len(unsent),
        "failed_not_forwarded_at_kill": sum(not x.ok for x in unsent),
        "retries": retries,
        "victim": victim.url,
        "killed_after_s": round(KILL_AT * duration, 2),
        "failures": described(before_byte + cut),
    }


async def failover(ctx: Ctx) -> Result:
    runs: dict[str, list[dict[str, Any]]] = {"gateway": []}
    for _ in range(ctx.options.repeat):  # a fresh trio each round: the kill is for good
        runs["gateway"].append(await _failover_round(ctx))
    rs = runs["gateway"]
    failed = sum(r["failed_before_first_byte"] for r in rs)
    at_victim = sum(r["failed_before_first_byte_at_victim"] for r in rs)
    waiting = sum(r["no_byte_at_kill"] for r in rs)
    cut = sum(r["cut_mid_stream"] for r in rs)
    total = sum(r["requests"] for r in rs)
    unsent = sum(r["not_forwarded_at_kill"] for r in rs)
    unsent_failed = sum(r["failed_not_forwarded_at_kill"] for r in rs)
    queued = sum(r["queued_at_kill"] for r in rs)
    rows = [
        Row(8, f"engine killed: failed before their first byte (of {waiting:,} without one at the kill)", "requests",
            None, None, failed, failed, f"0 (at the killed engine: {at_victim})", failed == 0),
        Row(8, f"engine killed: failed of those not yet forwarded (of {unsent:,}: queued or arriving later)",
            "requests", None, None, unsent_failed, unsent_failed, f"0 ({queued:,} in the gateway's queue at the kills)",
            unsent_failed == 0),
        Row(8, "engine killed: cut mid-stream (answering from the killed engine)", "requests", None, None, cut, cut,
            f"counted apart; {sum(r['in_flight_at_kill'] for r in rs):,} in flight at the kills", None),
        Row(8, f"completed of all requests, {len(rs)} kill(s)", "requests", None, None, total,
            sum(r["completed"] for r in rs), f"retries {sum(r['retries'] for r in rs):g}", None),
        Row(8, "requests/s over the run, 3 engines then 2", "req/s", None, None, med([r["rps"] for r in rs]),
            med([r["rps"] for r in rs]), "", None),
    ]  # fmt: skip
    params = {
        "sims": FAILOVER_SIMS,
        "tokens": FAILOVER_TOKENS,
        "clients": FAILOVER_CLIENTS,
        "max_concurrency": FAILOVER_SLOTS,
        "kill_at": f"{KILL_AT:.0%} of the run, SIGKILL of the fastest engine",
    }
    return Result(8, "three engines, the fastest killed (SIGKILL) under load with requests queued", params, runs, rows)


# -- 9: what routing among three engines costs, c=64 ------------------------------------------------------

ROUTED = {  # configuration: (engines, extra gateway flags)
    "one": (1, ()),
    "gateway": (3, ()),  # least-load, the default
    "session": (3, ("--routing", "session")),
    "prefix": (3, ("--routing", "prefix")),
}


@contextlib.contextmanager
def _routed(ctx: Ctx) -> Iterator[dict[str, Proc]]:
    """Three fixed-answer engines on the engine's CPU, direct access to the first, and a gateway per
    configuration.  Not the sim: three sims on one core serve fewer requests than one (three event loops,
    smaller batches), so the engines' side, not the routing, would set the ratio (bench/README.md)."""
    with contextlib.ExitStack() as stack:
        engines = []
        for _ in range(3):
            engines.append(start_engine(ctx.workdir, ctx.place.sim, 0.0))
            stack.callback(engines[-1].stop)
        procs = {"direct": engines[0]}
        for name, (count, extra) in ROUTED.items():
            more = [arg for e in engines[1:count] for arg in ("--upstream", e.url)]
            procs[name] = start_gateway(ctx.workdir, ctx.place.proxy, engines[0].url, *more, *extra, name=name)
            stack.callback(procs[name].stop)
        yield procs


async def routing_step_us(engines: int, requests: int, rounds: int) -> float:
    """The routing step alone, in this process: microseconds per request for ``Router.check``, ``admit`` and
    ``release`` over ``engines`` idle engines that report their KV cache (the best of ``rounds``)."""
    from gateway.app import Gateway  # the gateway's own objects, not a copy of its logic
    from gateway.routing.load import EngineLoad
    from gateway.settings import Settings

    gw = Gateway(Settings(upstream=[f"http://127.0.0.1:{9000 + i}" for i in range(engines)]))
    for upstream in gw.pool.upstreams:
        gw.pool.record_check(upstream, None, {MODEL: 1048576})
    router = gw.router
    for state in router.states.values():  # a fresh view for the whole measurement
        state.load, state.loaded_at = EngineLoad(0, 0, 600_000, 0), time.monotonic() + 3600
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(requests):
            router.check(40, MODEL)
            router.release(await router.admit(40, MODEL, None, 60.0))
        best = min(best, (time.perf_counter() - t0) / requests * 1e6)
    return best


async def routing_cost(ctx: Ctx) -> Result:
    o = ctx.options
    script = wrk.write_script(ctx.workdir / "routed.lua", chat_body(16))
    configs = ("direct", *ROUTED)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with _routed(ctx) as procs:
        if o.warmup:
            for name in configs:
                await wrk.run(ctx.wrk, procs[name].url + CHAT, script, 64, o.warmup, ctx.place.loadgen)
        for _, name in alternate(o.repeat, configs):
            work = wrk.run(ctx.wrk, procs[name].url + CHAT, script, 64, o.duration, ctx.place.loadgen)
            run, cpu, other = await measure(ctx, procs[name], work)
            run["proxy_cpu"], run["other_cpu"] = cpu, other
            runs[name].append(run)
    size = (2000, 2) if o.quick else (20000, 5)
    step = {n: await routing_step_us(n, *size) for n in (1, 3)}
    runs["routing_step"] = [{"engines": n, "us_per_request": us} for n, us in step.items()]
    rps = {n: med([r["rps"] for r in runs[n]]) for n in configs}
    per_cpu = {n: med([r["rps"] / r["proxy_cpu"] for r in runs[n] if r["proxy_cpu"]]) for n in ROUTED}
    one_us = 1e6 / per_cpu["one"]  # the gateway's CPU per request with one engine
    added = step[3] - step[1]
    expected = one_us / (one_us + added)
    cpu = {n: 100 * med([r["proxy_cpu"] for r in runs[n]]) for n in ROUTED}
    ratio = rps["gateway"] / rps["one"]
    rows = [
        Row(9, "requests/s, c=64, least-load over 3 engines (value: least-load / one engine)", "req/s",
            rps["direct"], None, rps["gateway"], ratio, f"≥ 0.95 × (one engine: {rps['one']:,.0f})", ratio >= 0.95),
        Row(9, "requests per gateway CPU-second (value: least-load / one engine)", "req/s", None, None,
            per_cpu["gateway"], per_cpu["gateway"] / per_cpu["one"],
            f"one engine: {per_cpu['one']:,.0f}; CPU {cpu['gateway']:.0f}% / {cpu['one']:.0f}%", None),
        Row(9, "routing step in-process, check + admit + release, 3 engines (value: µs added over one)", "µs",
            None, None, step[3], added, f"one engine: {step[1]:.1f} µs", None),
        Row(9, "least-load / one engine from CPU per request + that step (value: one / (one + added))", "",
            None, None, None, expected, f"≥ 0.95 × ({one_us:.0f} µs a request with one engine)", expected >= 0.95),
        Row(9, "requests/s, c=64, --routing session, no session key (value: session / one engine)", "req/s", None,
            None, rps["session"], rps["session"] / rps["one"], "", None),
        Row(9, "requests/s, c=64, --routing prefix (value: prefix / one engine)", "req/s", None, None,
            rps["prefix"], rps["prefix"] / rps["one"], "", None),
    ]  # fmt: skip
    params = {"connections": 64, "engines": "3 x bench.engine (fixed answers)", "engines_on": sorted(ctx.place.sim),
              "configs": ROUTED}  # fmt: skip
    return Result(9, "routing cost: one engine against least-load over three, c=64", params, runs, rows)
