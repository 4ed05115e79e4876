"""Command line and orchestration: check tools, pin cores, run the workloads, print and save results."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import env
from bench.procs import foreign_cpu_mark, foreign_cpu_since, raise_fd_limit
from bench.profile import Profiler, find_py_spy, render, summarize
from bench.workloads import WORKLOADS, Ctx, Options, Result, Row

RESULTS = Path(__file__).resolve().parent / "results"


def _workloads(text: str) -> list[int]:
    try:
        chosen = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of workload numbers: {text!r}") from None
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"workloads are {', '.join(map(str, WORKLOADS))}; got {text!r}")
    return chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark glm-gateway against nginx and direct access to the simulated vLLM engine.",
    )
    p.add_argument("--quick", action="store_true", help="tiny workloads (seconds); for the test suite")
    p.add_argument("--repeat", type=int, default=None, help="rounds of A/B/C per workload (default 3; quick 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run (default 5; quick 1)")
    p.add_argument(
        "--workloads", type=_workloads, default=list(WORKLOADS), help="comma-separated, e.g. 1,2 (default: all)"
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (default: %(default)s)")
    p.add_argument(
        "--install", action="store_true", help="install missing nginx/wrk with apt-get (and LiteLLM, with --litellm)"
    )
    p.add_argument(
        "--litellm",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="also measure LiteLLM's proxy in workloads 1-3 (its command: PATH, else on PATH or in bench/.litellm)",
    )
    p.add_argument(
        "--profile", action="store_true", help="sample the gateway with py-spy during its runs (skews its figures)"
    )
    return p


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit in ("ms", "× body"):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if unit == "KiB" or (unit == "µs" and abs(value) < 100):
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _value(row: Row) -> str:
    if row.value is None:
        return "—"
    _, named, value = row.metric.rpartition("(value: ")
    if named and " / " in value:  # a ratio: gateway / nginx, --workers 2 / --workers 1
        return f"{row.value:.2f} ×"
    if row.unit == "× body":
        return f"{row.value:.2f} ×"
    suffix = {"ms": " ms", "KiB": " KiB", "µs": " µs"}.get(row.unit, "")
    return _fmt(row.value, row.unit) + suffix


def table(rows: list[Row]) -> str:
    head = ("#", "metric", "unit", "direct", "nginx", "gateway", "result", "target", "")
    lines = [
        (str(r.workload), r.metric, r.unit, _fmt(r.direct, r.unit), _fmt(r.nginx, r.unit),
         _fmt(r.gateway, r.unit), _value(r), r.target, r.verdict)
        for r in rows
    ]  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = []
    for i, cells in enumerate([head, *lines]):
        out.append(
            "  ".join(
                c.ljust(w) if j in (1, 2, 7) else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    """The same table as Markdown, for bench/README.md."""
    out = [
        "| # | metric | direct | nginx | gateway | result | target | |",
        "|---|---|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        unit = f" ({r.unit})" if r.unit else ""
        out.append(
            f"| {r.workload} | {r.metric}{unit} | {_fmt(r.direct, r.unit)} | {_fmt(r.nginx, r.unit)} | "
            f"{_fmt(r.gateway, r.unit)} | {_value(r)} | {r.target} | {r.verdict} |"
        )
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def _row_dict(row: Row) -> dict[str, Any]:
    return {**dataclasses.asdict(row), "verdict": row.verdict}


def check_litellm(given: str, install: bool) -> str | None:
    litellm = env.find_litellm(given)
    if litellm is None and install and given == "auto":
        print(f"installing LiteLLM's proxy into {env.LITELLM_VENV}", flush=True)
        if env.install_litellm() != 0:
            print("installation failed", file=sys.stderr)
            return None
        litellm = env.find_litellm(given)
    if litellm is None:
        commands = " && ".join(shlex.join(c) for c in env.litellm_install_commands())
        print(
            f"The LiteLLM row needs LiteLLM's proxy ({given if given != 'auto' else 'litellm'} not found). "
            f"Install with:\n\n  {commands}\n\nor run `python -m bench --litellm --install` to have it run that.",
            file=sys.stderr,
        )
    return litellm


def check_tools(install: bool) -> tuple[str, str] | None:
    missing = env.missing_tools()
    if missing and install:
        print(f"installing {', '.join(missing)}: {shlex.join(env.install_command(missing))}", flush=True)
        if env.install(missing) != 0:
            print("installation failed", file=sys.stderr)
            return None
        missing = env.missing_tools()
    if missing:
        print(
            f"The benchmark needs {' and '.join(missing)}, which this machine lacks. Install with:\n\n"
            f"  {'sudo ' if os.geteuid() else ''}apt-get update && {shlex.join(env.install_command(missing))}\n\n"
            "or run `python -m bench --install` to have it run that command.",
            file=sys.stderr,
        )
        return None
    nginx, wrk = env.find_tool("nginx"), env.find_tool("wrk")
    assert nginx and wrk
    return nginx, wrk


QUIET_CORES = 0.15  # other processes' CPU below which the machine counts as quiet


async def wait_quiet(limit_s: float) -> tuple[float, float]:
    """On a shared machine, wait (up to ``limit_s``) until other processes leave the CPUs alone;
    returns the seconds waited and the last load seen (cores)."""
    t0 = time.monotonic()
    while True:
        mark = foreign_cpu_mark()
        await asyncio.sleep(1.0)
        load = foreign_cpu_since(mark)
        waited = time.monotonic() - t0
        if load < QUIET_CORES or waited >= limit_s:
            return waited, load
        print(f"  other processes use {load:.2f} cores: waiting for a quiet machine", flush=True)


async def run_all(ctx: Ctx, chosen: list[int]) -> list[Result]:
    results = []
    for number in chosen:
        waited, load = await wait_quiet(0 if ctx.options.quick else 120)
        t0 = time.monotonic()
        print(f"workload {number} ...", flush=True)
        ctx.background.clear()
        result = await WORKLOADS[number](ctx)
        result.seconds = time.monotonic() - t0
        worst = max(ctx.background, default=0.0)
        result.params["background"] = {
            "waited_s": round(waited, 1),
            "cores_before": round(load, 3),
            "cores_max_during_runs": round(worst, 3),
        }
        if worst >= QUIET_CORES:
            print(f"  warning: other processes used up to {worst:.2f} cores during these runs", flush=True)
        if ctx.profiler is not None and ctx.profiler.stacks:
            result.profile = summarize(ctx.profiler.stacks)
            result.profile["stacks"] = dict(ctx.profiler.stacks.most_common(300))
            print(f"workload {number}: gateway profile (py-spy)\n{render(result.profile)}", flush=True)
            ctx.profiler.stacks.clear()
        print(f"workload {number}: {result.title} ({result.seconds:.0f} s)", flush=True)
        for row in result.rows:
            print(f"  {row.metric}: {_value(row)} {row.target} {row.verdict}", flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if sys.platform != "linux":
        print("the benchmark needs Linux (/proc, CPU affinity)", file=sys.stderr)
        return 2
    tools = check_tools(ns.install)
    if tools is None:
        return 3
    nginx, wrk = tools
    litellm = None if ns.litellm is None else check_litellm(ns.litellm, ns.install)
    if ns.litellm is not None and litellm is None:
        return 3
    options = Options.make(ns.quick, ns.repeat, ns.duration)
    place = env.placement()
    machine, versions = env.machine(), env.versions(nginx, wrk)
    if litellm is not None:
        versions["litellm"] = env.litellm_version(litellm)
    nofile = raise_fd_limit()
    os.sched_setaffinity(0, place.loadgen)  # this process is the streams' load generator
    started = dt.datetime.now(dt.UTC)
    print(f"machine: {machine['cpu_model']}, {machine['cpus_online']} CPUs, kernel {machine['kernel']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"placement: proxies on CPU {sorted(place.proxy)}, load generator on {sorted(place.loadgen)}, "
        f"engine on {sorted(place.sim)}{'' if place.pinned else ' (one CPU: not pinned)'}; open files {nofile}"
    )
    if ns.profile:
        print("profiling the gateway with py-spy: its figures in this run are skewed by the sampling")
    print(f"options: repeat {options.repeat}, {options.duration:g} s a run, workloads {ns.workloads}", flush=True)
    py_spy = find_py_spy() if ns.profile else None
    if ns.profile and py_spy is None:
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="glm-bench-") as tmp:
        profiler = Profiler(py_spy, Path(tmp) / "profile", place.loadgen) if py_spy else None
        ctx = Ctx(options, place, nginx, wrk, Path(tmp), profiler, litellm)
        results = asyncio.run(run_all(ctx, ns.workloads))
    finished = dt.datetime.now(dt.UTC)
    rows = [row for r in results for row in r.rows]
    print()
    print(table(rows))
    noisy = {r.workload: r.params["background"]["cores_max_during_runs"] for r in results}
    noisy = {w: c for w, c in noisy.items() if c >= QUIET_CORES}
    if noisy:
        print(
            "\nwarning: the machine was shared; other processes took CPU during workloads "
            + ", ".join(f"{w} (up to {c:.2f} cores)" for w, c in noisy.items())
            + ": rerun those for clean figures"
        )
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "seconds": round((finished - started).total_seconds(), 1),
        "command": shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]),
        "options": dataclasses.asdict(options),
        "machine": machine,
        "versions": versions,
        "placement": place.public(),
        "open_files_limit": nofile,
        "rows": [_row_dict(r) for r in rows],
        "workloads": {
            str(r.workload): {
                "title": r.title,
                "params": r.params,
                "seconds": round(r.seconds, 1),
                "rows": [_row_dict(x) for x in r.rows],
                "runs": r.runs,
                "profile": r.profile,
            }
            for r in results
        },
    }
    ns.results_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if options.quick else "") + ("-profile" if ns.profile else "")
    path = ns.results_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}{suffix}.json"
    path.write_text(json.dumps(_jsonable(doc), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nresults: {path}  ({doc['seconds']:.0f} s)")
    return 0
