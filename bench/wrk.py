"""wrk runs: POST a JSON body from a Lua script, read throughput and latency percentiles back."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

_MARK = "BENCH_RESULT "
API_KEY = "sk-bench-0123456789abcdef"  # sent to every configuration; the keyed gateway checks it

# wrk's HdrHistogram, the one behind --latency, read in microseconds through the done() hook
LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = [==[{body}]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "{mark}{{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, \\"connect_errors\\": %d, "
    .. "\\"read_errors\\": %d, \\"write_errors\\": %d, \\"status_errors\\": %d, \\"timeouts\\": %d, "
    .. "\\"p50_us\\": %.1f, \\"p90_us\\": %.1f, \\"p99_us\\": %.1f, \\"mean_us\\": %.1f, \\"max_us\\": %.1f}}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def write_script(path: Path, body: bytes) -> Path:
    if b"]==]" in body:
        raise ValueError("the body cannot be embedded in a Lua long string")
    path.write_text(LUA.format(body=body.decode(), mark=_MARK, key=API_KEY), encoding="utf-8")
    return path


def _pin(cpus: frozenset[int]) -> Any:
    return lambda: os.sched_setaffinity(0, cpus)


async def run(
    wrk: str,
    url: str,
    script: Path,
    connections: int,
    duration: float,
    cpus: frozenset[int],
    threads: int = 1,
) -> dict[str, Any]:
    """One wrk run; returns requests/s, latency percentiles (ms) and error counts."""
    args = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
        "--timeout", "10s", "-s", str(script), url,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_pin(cpus),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=duration + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"wrk did not finish: {args}") from None
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith(_MARK):
            raw = json.loads(line[len(_MARK) :])
            break
    else:
        raise RuntimeError(f"wrk gave no result (rc {proc.returncode}):\n{text}")
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "requests": raw["requests"],
        "seconds": seconds,
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": errors,
        "error_detail": {k: raw[k] for k in raw if k.endswith("errors") or k == "timeouts"},
    }
