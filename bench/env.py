"""The machine and its tools: find nginx and wrk, describe the host, pick the cores to pin to."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TOOLS = {"nginx": "nginx", "wrk": "wrk"}  # command -> Debian package
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# LiteLLM's proxy (optional row) lives in a virtual environment of its own: its many dependencies
# must not change what the gateway is measured with.
LITELLM_VENV = Path(__file__).resolve().parent / ".litellm"


def find_tool(name: str) -> str | None:
    """A tool on PATH, or in an sbin directory that a non-root PATH may lack (Debian's nginx)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_tools() -> list[str]:
    return [name for name in TOOLS if find_tool(name) is None]


def install_command(names: list[str]) -> list[str]:
    """The exact command that installs the tools (Debian/Ubuntu)."""
    packages = [TOOLS[n] for n in names]
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    return [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]


def install(names: list[str]) -> int:
    """Install the tools with apt-get (only when asked to with --install)."""
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    rc = subprocess.call([*prefix, "apt-get", "update", "-q"], env=env)
    if rc == 0:
        rc = subprocess.call(install_command(names), env=env)
    return rc


def find_litellm(given: str) -> str | None:
    """LiteLLM's command: the path given, else ``litellm`` on PATH, else the one ``--install`` puts in
    bench/.litellm."""
    if given != "auto":
        return given if os.access(given, os.X_OK) else None
    installed = LITELLM_VENV / "bin" / "litellm"
    return shutil.which("litellm") or (str(installed) if os.access(installed, os.X_OK) else None)


def litellm_install_commands() -> list[list[str]]:
    return [
        [sys.executable, "-m", "venv", str(LITELLM_VENV)],
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
    ]


def install_litellm() -> int:
    """Install LiteLLM's proxy into bench/.litellm (only when asked to with --install)."""
    for cmd in litellm_install_commands():
        rc = subprocess.call(cmd)
        if rc != 0:
            return rc
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    return {
        "cpu_model": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "system": platform.system(),
        "hostname": platform.node(),
    }


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def litellm_version(litellm: str) -> str:
    return _first_line([litellm, "--version"]).rpartition("=")[2].strip()


def versions(nginx: str, wrk: str) -> dict[str, str]:
    import aiohttp
    import uvloop

    import gateway

    return {
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "glm-gateway": gateway.__version__,
        "nginx": _first_line([nginx, "-v"]).removeprefix("nginx version: ").removeprefix("nginx/"),
        "wrk": " ".join(_first_line([wrk, "--version"]).split()[1:2]),
    }


@dataclass(frozen=True)
class Placement:
    """Which cores each party runs on: the proxies alone on one, load generator and engine on others."""

    proxy: frozenset[int]
    loadgen: frozenset[int]
    sim: frozenset[int]
    pinned: bool

    def public(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("proxy", "loadgen", "sim"):
            out[key] = sorted(out[key])
        return out


def placement() -> Placement:
    """Two cores: proxies on the first, load generator and engine share the second; three or more:
    the engine gets a core of its own.  One core: nothing is pinned (figures are then indicative)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        every = frozenset(cpus)
        return Placement(every, every, every, pinned=False)
    proxy, loadgen = frozenset(cpus[:1]), frozenset(cpus[1:2])
    sim = frozenset(cpus[2:3]) if len(cpus) >= 3 else loadgen
    return Placement(proxy, loadgen, sim, pinned=True)
