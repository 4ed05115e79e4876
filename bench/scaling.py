"""Workload 10, ``--workers``: one worker against two, in front of an engine cheap enough not to be the limit."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import wrk
from bench.procs import Proc, foreign_cpu_mark, foreign_cpu_since, start_engine, start_gateway, start_sim
from bench.workloads import CHAT, FAST_SIM, Ctx, Result, Row, alternate, chat_body, med

CHAT_TOKENS = 16  # workload 2's small chat
STREAM_TOKENS = 256  # workload 3's streams
# The fixed-answer engine sends each stream's events at once (one chunk each, in one write): with events
# paced by a timer, a saturated gateway reads several events per read and keeps up with any pace, so the
# engine's pace, not the gateway, sets the events/s (measured: 98,000 direct, 92,000 through one worker at
# 1 ms and c=128).  At once, what one worker can relay per second is what is measured.
STREAM_ITL = 0.0
STREAM_CONNECTIONS = 64
WORKERS = {"w1": "1", "w2": "2"}
ENGINE_HEADROOM = 3.0  # direct access must serve this many times one worker's rate, else the engine limits


def cores(ctx: Ctx) -> tuple[frozenset[int], frozenset[int], frozenset[int], bool]:
    """The gateway's two cores, the load generator's and the engine's: apart with 4 or more CPUs; on fewer,
    everything shares every CPU (two workers need two cores, which leaves none to set apart)."""
    cpus = sorted(os.sched_getaffinity(0) | ctx.place.proxy | ctx.place.loadgen | ctx.place.sim)
    if len(cpus) >= 4:
        return frozenset(cpus[:2]), frozenset(cpus[2:3]), frozenset(cpus[3:4]), True
    every = frozenset(cpus)
    return every, every, every, False


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/status", timeout=5) as r:
        return dict(json.load(r))


def _wait_workers(proc: Proc, count: int, timeout: float = 30.0) -> None:
    """Until every worker of ``proc`` is connected to its parent (``/status``), so both serve from the start."""
    deadline = time.monotonic() + timeout
    while True:
        workers = _status(proc.url).get("workers", [])
        if sum(1 for w in workers if w.get("connected")) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: {count} workers did not connect within {timeout:g} s: {workers}")
        time.sleep(0.1)


@contextlib.contextmanager
def _services(ctx: Ctx, gw_cpus: frozenset[int], engine_cpus: frozenset[int]) -> Iterator[dict[str, Proc]]:
    with contextlib.ExitStack() as stack:
        procs: dict[str, Proc] = {}

        def started(name: str, proc: Proc) -> None:
            procs[name] = proc
            stack.callback(proc.stop)

        started("direct", start_engine(ctx.workdir, engine_cpus, STREAM_ITL))
        started("sim", start_sim(ctx.workdir, engine_cpus, **FAST_SIM))
        for name, count in WORKERS.items():
            started(name, start_gateway(ctx.workdir, gw_cpus, procs["direct"].url, "--workers", count, name=name))
            if count != "1":
                _wait_workers(procs[name], int(count))
        yield procs


def _children_cpu_s() -> float:
    """CPU of this process's children that have exited (wrk, once a run is over)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _run(
    ctx: Ctx, proc: Proc, engine: Proc, script: Path, connections: int, cpus: frozenset[int], duration: float
) -> dict[str, Any]:
    """One wrk run, with the CPU the gateway's parent and all its processes, the engine and wrk used meanwhile;
    with --profile, the parent of ``--workers 2`` (the coordination) is sampled."""
    profiler = ctx.profiler if proc.name == "w2" else None
    if profiler is not None:
        await profiler.start(proc.pid)
    mark = foreign_cpu_mark()
    parent0, all0, t0 = proc.cpu_seconds(proc.pid), proc.all_cpu_seconds(), time.monotonic()
    engine0, wrk0 = engine.cpu_seconds(), _children_cpu_s()
    try:
        run = await wrk.run(ctx.wrk, proc.url + CHAT, script, connections, duration, cpus)
    finally:
        if profiler is not None:
            await profiler.stop()
    seconds = time.monotonic() - t0
    run["cpu_parent_s"] = proc.cpu_seconds(proc.pid) - parent0
    run["cpu_all_s"] = proc.all_cpu_seconds() - all0
    run["cpu_engine_s"] = engine.cpu_seconds() - engine0
    run["cpu_wrk_s"] = _children_cpu_s() - wrk0  # (and py-spy's, with --profile)
    run["cpu_share"] = run["cpu_all_s"] / seconds
    run["other_cpu"] = other = foreign_cpu_since(mark)
    ctx.background.append(other)
    return run


SHAPES = {  # name: (connections, configurations)
    "chat64": (64, ("direct", "sim", "w1", "w2")),
    "stream": (STREAM_CONNECTIONS, ("direct", "w1", "w2")),
    "chat1": (1, ("direct", "w1", "w2")),
}


async def workers(ctx: Ctx) -> Result:
    o = ctx.options
    gw_cpus, loadgen, engine_cpus, pinned = cores(ctx)
    scripts = {
        "chat64": wrk.write_script(ctx.workdir / "w-chat.lua", chat_body(CHAT_TOKENS)),
        "stream": wrk.write_script(ctx.workdir / "w-stream.lua", chat_body(STREAM_TOKENS, stream=True)),
    }
    scripts["chat1"] = scripts["chat64"]
    runs: dict[str, list[dict[str, Any]]] = {f"{s}:{c}": [] for s, (_, cs) in SHAPES.items() for c in cs}
    served: dict[str, Any] = {}
    with _services(ctx, gw_cpus, engine_cpus) as procs:
        if o.warmup:
            for shape, (conns, configs) in SHAPES.items():
                for name in configs:
                    await wrk.run(ctx.wrk, procs[name].url + CHAT, scripts[shape], conns, o.warmup, loadgen)
        for _, key in alternate(o.repeat, tuple(runs)):
            shape, name = key.split(":")
            conns = SHAPES[shape][0]
            runs[key].append(await _run(ctx, procs[name], procs["direct"], scripts[shape], conns, loadgen, o.duration))
        served = {w["index"]: w["admitted"] for w in _status(procs["w2"].url).get("workers", [])}
    return Result(10, "--workers 1 against --workers 2, fixed-answer engine", _params(pinned, gw_cpus, served), runs,
                  _rows(runs, len(gw_cpus), pinned))  # fmt: skip


def _params(pinned: bool, gw_cpus: frozenset[int], served: dict[str, Any]) -> dict[str, Any]:
    return {
        "engine": f"bench.engine (fixed answers), {STREAM_TOKENS}-event streams, events {STREAM_ITL * 1000:g} ms apart",
        "stream_connections": STREAM_CONNECTIONS,
        "pinned": pinned,
        "gateway_cpus": sorted(gw_cpus),
        "placement": "gateway on 2 CPUs, load generator and engine on others"
        if pinned
        else "unpinned: gateway, engine and wrk share every CPU",
        "w2_admitted_per_worker": served,
        "load_generator": "wrk (also for the streams: events = completed streams x tokens)",
    }


def _rows(runs: dict[str, list[dict[str, Any]]], cores: int, pinned: bool) -> list[Row]:
    def m(key: str, field: str) -> float:
        return med([r[field] for r in runs[key]])

    def per_request(key: str, field: str) -> float:
        return med([r[field] / r["requests"] * 1e6 for r in runs[key] if r["requests"]])

    rps = {k: m(k, "rps") for k in runs}
    eps = {k: rps[k] * STREAM_TOKENS for k in runs if k.startswith("stream:")}
    p50 = {k: m(k, "p50_ms") for k in runs if k.startswith("chat1:")}
    r_req = rps["chat64:w2"] / rps["chat64:w1"]
    r_ev = eps["stream:w2"] / eps["stream:w1"]
    head_req = rps["chat64:direct"] / rps["chat64:w1"]
    head_ev = eps["stream:direct"] / eps["stream:w1"]
    added1 = p50["chat1:w1"] - p50["chat1:direct"]
    cpu = {k: per_request(k, "cpu_all_s") for k in ("chat64:w1", "chat64:w2", "stream:w1", "stream:w2")}
    parent = per_request("chat64:w2", "cpu_parent_s")
    parent_stream = per_request("stream:w2", "cpu_parent_s")
    share = {k: 100 * m(k, "cpu_share") for k in ("chat64:w1", "chat64:w2", "stream:w1", "stream:w2")}
    # Unpinned, the engine and wrk take their CPU per request from the gateway's cores: two workers at one worker's
    # CPU per request (c) can serve at most cores / (c + theirs), against one worker's 1 / c.
    engine, load = per_request("chat64:w2", "cpu_engine_s"), per_request("chat64:w2", "cpu_wrk_s")
    bound = cores * cpu["chat64:w1"] / (cpu["chat64:w1"] + (0.0 if pinned else engine + load))
    return [
        Row(10, "requests/s, c=64 small chat (value: --workers 2 / --workers 1)", "req/s", rps["chat64:direct"],
            None, rps["chat64:w2"], r_req, f"≥ 1.7 × (--workers 1: {rps['chat64:w1']:,.0f})", r_req >= 1.7),
        Row(10, f"SSE events/s, c={STREAM_CONNECTIONS} streams (value: --workers 2 / --workers 1)", "ev/s",
            eps["stream:direct"], None, eps["stream:w2"], r_ev, f"≥ 1.7 × (--workers 1: {eps['stream:w1']:,.0f})",
            r_ev >= 1.7),
        Row(10, "what the cores allow that ratio (value: cores x c / (c + engine's + wrk's CPU per request))", "×",
            None, None, None, bound, f"engine {engine:.0f} µs, wrk {load:.0f} µs a request at --workers 2"
            + ("" if not pinned else " (on cores of their own)"), None),
        Row(10, "engine headroom, c=64 chat (value: direct / --workers 1)", "req/s", rps["chat64:direct"], None,
            rps["chat64:w1"], head_req, f"≥ {ENGINE_HEADROOM:g} ×: the engine is not the limit",
            head_req >= ENGINE_HEADROOM),
        Row(10, "engine headroom, streams (value: direct / --workers 1)", "ev/s", eps["stream:direct"], None,
            eps["stream:w1"], head_ev, f"≥ {ENGINE_HEADROOM:g} ×: the engine is not the limit",
            head_ev >= ENGINE_HEADROOM),
        Row(10, "the sim instead, direct, c=64 (value: sim direct / --workers 1)", "req/s", rps["chat64:sim"], None,
            None, rps["chat64:sim"] / rps["chat64:w1"], "why the fixed-answer engine", None),
        Row(10, "latency p50, c=1, --workers 1 (value: added over direct)", "ms", p50["chat1:direct"], None,
            p50["chat1:w1"], added1, "≤ 0.3 ms (workload 1's target)", added1 <= 0.3),
        Row(10, "latency p50, c=1, --workers 2 (value: added over --workers 1)", "ms", None, None, p50["chat1:w2"],
            p50["chat1:w2"] - p50["chat1:w1"], "the coordination's round trip", None),
        Row(10, "coordination: parent CPU per request, --workers 2, c=64", "µs", None, None, parent, parent,
            f"streams: {parent_stream:.0f} µs", None),
        Row(10, "gateway CPU per request, c=64 chat (value: --workers 2 / --workers 1)", "µs", None, None,
            cpu["chat64:w2"], cpu["chat64:w2"] / cpu["chat64:w1"],
            f"--workers 1: {cpu['chat64:w1']:.0f} µs; cores used {share['chat64:w1']:.0f}% / {share['chat64:w2']:.0f}%",
            None),
        Row(10, "gateway CPU per stream (value: --workers 2 / --workers 1)", "µs", None, None, cpu["stream:w2"],
            cpu["stream:w2"] / cpu["stream:w1"],
            f"--workers 1: {cpu['stream:w1']:.0f} µs; cores used {share['stream:w1']:.0f}% / {share['stream:w2']:.0f}%",
            None),
    ]  # fmt: skip
