"""Optional sampling profiles of the gateway under a workload, with py-spy (``--profile``)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_py_spy() -> str | None:
    """py-spy beside this interpreter (a venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` of one process while a run is measured; collapsed stacks accumulate."""

    def __init__(self, py_spy: str, out: Path, cpus: frozenset[int], rate: int = 250) -> None:
        self.py_spy = py_spy
        self.out = out
        self.cpus = cpus
        self.rate = rate
        self.stacks: collections.Counter[str] = collections.Counter()
        self._proc: asyncio.subprocess.Process | None = None
        self._n = 0

    async def start(self, pid: int) -> None:
        self._n += 1
        path = self.out.with_suffix(f".{self._n}.txt")
        cpus = self.cpus
        self._path = path
        self._proc = await asyncio.create_subprocess_exec(
            self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
            "--nonblocking", "--output", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )  # fmt: skip
        await asyncio.sleep(0.3)  # let it attach

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self._proc.wait(), 20)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None
        if self._path.exists():
            for line in self._path.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    self.stacks[stack] += int(count)


def _key(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    if "/gateway/" in file:
        file = "gateway/" + file.rsplit("/gateway/", 1)[1]
    return f"{m['func']} ({file}:{m['line']})" if with_line and m["line"] else f"{m['func']} ({file})"


def summarize(stacks: collections.Counter[str], top: int = 25) -> dict[str, Any]:
    """Self time by line, inclusive time by function, and inclusive time of gateway code by line."""
    total = sum(stacks.values())
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    gw_lines: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        self_t[_key(frames[-1], True)] += count
        for key in {_key(f, False) for f in frames}:
            incl[key] += count
        for key in {_key(f, True) for f in frames if "gateway/" in f and "/sim/" not in f}:
            gw_lines[key] += count

    def share(c: collections.Counter[str]) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self_by_line_pct": share(self_t),
        "inclusive_by_function_pct": share(incl),
        "gateway_lines_inclusive_pct": share(gw_lines),
    }


def render(summary: dict[str, Any], top: int = 15) -> str:
    out = [f"  {summary['samples']} samples"]
    for title, key in (
        ("self time, by line", "self_by_line_pct"),
        ("inclusive time, by function", "inclusive_by_function_pct"),
        ("gateway code, inclusive, by line", "gateway_lines_inclusive_pct"),
    ):
        out.append(f"  {title}:")
        out += [f"    {pct:5.1f}%  {name}" for name, pct in summary[key][:top]]
    return "\n".join(out)
