"""The processes under test: the simulated engine, nginx and the gateway, pinned and measured via /proc."""

from __future__ import annotations

import os
import pwd
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench.wrk import API_KEY
from gateway.access import keys as access_keys

MODEL = "glm-4-9b-chat-1m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft open-files limit (inherited by every child) as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _pin(cpus: frozenset[int]) -> Callable[[], None]:
    def preexec() -> None:
        os.sched_setaffinity(0, cpus)

    return preexec


def _child_env() -> dict[str, str]:
    """The environment without GATEWAY_* settings that would change what is measured."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0, status: int = 200) -> None:
    """Block until url answers ``status``; fail early when the process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == status:
                    return
        except urllib.error.HTTPError as e:
            if e.code == status:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer {status} within {timeout:g} s")
        time.sleep(0.05)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def host_cpu_seconds() -> float:
    """CPU seconds processes have used on the whole machine: user, nice and system time (the network
    stack's softirq work for our own traffic, which no process is charged for, is left out)."""
    with open("/proc/stat", encoding="ascii") as f:
        user, nice, system = (int(x) for x in f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (wrk, py-spy)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


LIVE: list[Proc] = []  # every process this run has started and not yet stopped


class Proc:
    """One started process: its pid (or its worker's), memory and descriptors, and an orderly stop."""

    def __init__(
        self, name: str, args: list[str], cpus: frozenset[int], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**_child_env(), **(env or {})},
            preexec_fn=_pin(cpus),
        )
        self.url = ""
        LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def serving_pid(self) -> int:
        """The process that handles the connections (nginx: the worker, a child of the master)."""
        return self.pid

    def rss_kib(self) -> int:
        return _status_kib(self.serving_pid(), "VmRSS")

    def hwm_kib(self) -> int:
        return _status_kib(self.serving_pid(), "VmHWM")

    def reset_hwm(self) -> bool:
        """Reset the peak-RSS mark (VmHWM) to the current RSS; False where the kernel refuses."""
        try:
            with open(f"/proc/{self.serving_pid()}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.serving_pid()}/fd"))

    def cpu_seconds(self, pid: int | None = None) -> float:
        """User + system CPU time of the serving process, from /proc/PID/stat."""
        try:
            with open(f"/proc/{pid or self.serving_pid()}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def children(self) -> list[int]:
        """The process's children: nginx's worker, the gateway's ``--workers``."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children", encoding="ascii") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def all_cpu_seconds(self) -> float:
        """CPU time of the process and its children (nginx's worker, the gateway's workers)."""
        return self.cpu_seconds(self.pid) + sum(self.cpu_seconds(pid) for pid in self.children())

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self in LIVE:
            LIVE.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()


class Nginx(Proc):
    def serving_pid(self) -> int:
        children = self.children()
        return children[0] if children else self.pid


def foreign_cpu_mark() -> tuple[float, float, float]:
    """A mark to measure, later, how much CPU processes other than ours used (a shared machine)."""
    ours = own_cpu_seconds() + sum(p.all_cpu_seconds() for p in LIVE)
    return time.monotonic(), host_cpu_seconds(), ours


def foreign_cpu_since(mark: tuple[float, float, float]) -> float:
    """Cores' worth of CPU used by other processes since ``mark`` (0 on a quiet machine)."""
    t0, host0, ours0 = mark
    ours = own_cpu_seconds() + sum(p.all_cpu_seconds() for p in LIVE)
    elapsed = time.monotonic() - t0
    return max(0.0, ((host_cpu_seconds() - host0) - (ours - ours0)) / elapsed) if elapsed > 0 else 0.0


def start_sim(workdir: Path, cpus: frozenset[int], **settings: float | int | str) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "gateway", "sim", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return _started(Proc("sim", args, cpus, workdir / "sim.log"), port, "/health")


def start_engine(workdir: Path, cpus: frozenset[int], itl: float) -> Proc:
    """bench.engine: pre-built answers, far cheaper per request than the sim (see its docstring)."""
    port = free_port()
    args = [sys.executable, "-m", "bench.engine", "--port", str(port), "--itl", str(itl)]
    return _started(Proc("engine", args, cpus, workdir / "engine.log"), port, "/health")


def start_gateway(workdir: Path, cpus: frozenset[int], upstream: str, *extra: str, name: str = "gateway") -> Proc:
    """glm-gateway serve, one process, every feature on: admission with a token budget, histograms,
    request ids, engine /metrics aggregation, health checks."""
    port = free_port()
    args = [
        sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--upstream", upstream, "--max-concurrency", "2048", "--max-queue", "4096",
        "--max-tokens-in-flight", "4000000000", "--log-level", "warning", *extra,
    ]  # fmt: skip
    return _started(Proc(name, args, cpus, workdir / f"{name}.log"), port, "/health/ready")


def start_keyed_gateway(workdir: Path, cpus: frozenset[int], upstream: str) -> Proc:
    """The gateway with a keys file: wrk's key, with rate limits checked on every request but never hit."""
    keys = workdir / "keys.toml"
    keys.write_text(
        f'[[key]]\nname = "bench"\nsha256 = "{access_keys.digest(API_KEY)}"\n'
        "requests_per_minute = 1000000000\ntokens_per_minute = 1000000000000\n"
    )
    return start_gateway(workdir, cpus, upstream, "--keys-file", str(keys), name="keys")


def start_floor(workdir: Path, cpus: frozenset[int], upstream: str) -> Proc:
    """bench.floor: aiohttp's server and the gateway's engine client with no feature (see its docstring)."""
    port = free_port()
    args = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream]
    return _started(Proc("floor", args, cpus, workdir / "floor.log"), port, "/health")


LITELLM_CONF = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: hosted_vllm/{model}
      api_base: {upstream}/v1
      api_key: none
"""


def start_litellm(workdir: Path, cpus: frozenset[int], litellm: str, upstream: str) -> Proc:
    """LiteLLM's proxy, one worker, routing the model to the engine as a vLLM server (no master key:
    loopback only)."""
    port = free_port()
    conf = workdir / "litellm.yaml"
    conf.write_text(LITELLM_CONF.format(model=MODEL, upstream=upstream))
    args = [litellm, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    env = {"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true", "LITELLM_LOG": "ERROR"}
    return _started(Proc("litellm", args, cpus, workdir / "litellm.log", env), port, "/health/liveliness", 120)


def _started(proc: Proc, port: int, health_path: str, timeout: float = 30.0) -> Proc:
    """Wait until a process answers its health path on port; stop it and show its log if it never does."""
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc.url + health_path, proc.proc, timeout)
    except RuntimeError:
        proc.stop()
        raise RuntimeError(f"{proc.name} did not start:\n{proc.log_tail()}") from None
    return proc


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 64m;
    upstream engine {{
        server {upstream};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, cpus: frozenset[int], nginx: str, upstream: str) -> Nginx:
    """nginx with one worker, no buffering either way, HTTP/1.1 keep-alive pool to the engine;
    config, pid and logs in the work directory so it runs without root paths."""
    port = free_port()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    user = f"user {pwd.getpwuid(0).pw_name};\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            dir=workdir,
            nofile=nofile,
            connections=max(1024, nofile // 2),
            upstream=upstream.removeprefix("http://"),
            port=port,
        )
    )
    args = [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    proc = Nginx("nginx", args, cpus, workdir / "nginx.log")
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc.url + "/health", proc.proc)
    except RuntimeError:
        proc.stop()
        errors = (
            (workdir / "nginx-error.log").read_text(errors="replace") if (workdir / "nginx-error.log").exists() else ""
        )
        raise RuntimeError(f"nginx did not start:\n{proc.log_tail()}\n{errors}") from None
    return proc
