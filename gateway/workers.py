"""``--workers N``: one parent owns the listening socket and the coordination, and supervises N worker
processes that serve it (each a whole gateway whose admission asks the parent); a dead worker is restarted."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.core import Metric

from gateway import logs
from gateway.access.limits import LocalStore, RedisStore
from gateway.app import Gateway, drain_on_signal
from gateway.coordinator import Authority, RemoteAdmission, families, gateway_series
from gateway.listener import ListenError, make_runner, raise_open_files
from gateway.settings import Settings

log = logging.getLogger("gateway.workers")

_QUICK_DEATH = 1.0  # a worker that dies sooner than this after its start waits as long before its restart
_PR_SET_PDEATHSIG = 1


class _Others:
    """The series of a registry that are not the gateway's own (process, GPU, host): one worker's."""

    def __init__(self, collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterable[Metric]:
        return (m for m in self.collectors.collect() if not gateway_series(m.name))


class WorkerGateway(Gateway):
    """One worker's gateway: admission asked of the parent; /metrics and /status answer for all workers."""

    def __init__(self, settings: Settings, remote: RemoteAdmission, workers: int) -> None:
        super().__init__(settings, remote)  # type: ignore[arg-type]
        self.remote = remote
        remote.series = lambda: families(self.registry.collect(), gateway_series)
        if self.access is not None:  # without Redis a key's rate is split between the workers
            store = self.access.limiter.store
            if isinstance(store, RedisStore):
                store.fallback = LocalStore(settings.replicas * workers)
            else:
                self.access.limiter.store = LocalStore(workers)

    async def metrics_page(self, request: web.Request) -> web.Response:
        """The gateway_* series of every worker merged by the parent, then this one's process, GPU, host and
        engine series (collected once per scrape, by the worker that answers it)."""
        await self.engines.refresh(self.session)
        body = await self.remote.metrics() + generate_latest(_Others(self.registry)) + self.engines.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    def _routes(self) -> tuple[list[web.RouteDef], list[web.RouteDef]]:
        probes, admin = super()._routes()
        return probes, [self._all_workers(r) if r.path == "/status" else r for r in admin]

    def _all_workers(self, route: web.RouteDef) -> web.RouteDef:
        handler = route.handler

        async def status(request: web.Request) -> web.StreamResponse:
            response = await handler(request)
            if response.status != 200 or not isinstance(response, web.Response) or response.text is None:
                return response
            body = json.loads(response.text)
            parent = await self.remote.status()
            body |= {"admission": parent["admission"], "worker": self.remote.index, "workers": parent["workers"]}
            return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json")

        return web.RouteDef(route.method, route.path, status, route.kwargs)


# -- the parent -------------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {(exc.strerror or str(exc)).lower()}") from None
    sock.set_inheritable(True)
    return sock


@dataclasses.dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0


class Supervisor:
    """Starts the workers, restarts one that dies (logged, counted in /status), forwards SIGTERM, SIGINT and
    SIGHUP, and exits 0 when every worker has drained and exited 0."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [_Worker(i) for i in range(settings.worker_count)]
        self.authority = Authority(settings, self.describe, self._connected)
        self.stopping = False

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for w in self.workers:
            link = self.authority.links.get(w.index)
            out.append({
                "index": w.index, "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                "uptime_seconds": round(now - w.started, 3), "connected": link is not None,
                "admitted": link.admitted if link else 0,
            })  # fmt: skip
        return out

    async def run(self, announce: Callable[[str], None] | None = None) -> int:
        raise_open_files(self.settings.max_connections)
        sock = _bind(self.settings.host, self.settings.port)
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="glm-gateway-") as tmp:
            path = os.path.join(tmp, "coordinator.sock")
            server = await self.authority.serve(path)
            watch = asyncio.create_task(self.authority.watch_keys(), name="keys-file-watch")
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop, signum)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            kept = [asyncio.create_task(self._keep(w, sock, path)) for w in self.workers]
            url = f"http://{self.settings.host}:{self.settings.port}"
            log.info("glm-gateway listening on %s with %d workers", url, len(self.workers))
            if announce is not None:
                announce(url)
            codes = await asyncio.gather(*kept)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            watch.cancel()
            server.close()
        sock.close()
        log.info("every worker exited (%s)", ", ".join(map(str, codes)))
        return 0 if not any(codes) else 1

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(self.workers))
        self.stopping = True
        self._forward(signal.SIGTERM)  # a second one cuts the workers' requests off, as in one process

    def _reload(self) -> None:
        self.authority.reload()
        if self.settings.keys_file:  # a worker without a keys file has no SIGHUP handler
            self._forward(signal.SIGHUP)

    def _forward(self, signum: int) -> None:
        """To each worker that has connected: one still starting has no handler yet, and is told on connecting
        (``_connected``), or reads the keys file fresh."""
        for w in self.workers:
            link = self.authority.links.get(w.index)
            if w.proc is not None and w.proc.returncode is None and link is not None and link.pid == w.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    def _connected(self, index: int) -> None:
        proc = self.workers[index].proc
        if self.stopping and proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)

    async def _keep(self, worker: _Worker, sock: socket.socket, path: str) -> int:
        while True:
            worker.started = time.monotonic()
            proc = worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.workers", str(sock.fileno()), str(worker.index),
                str(len(self.workers)), path, stdin=asyncio.subprocess.PIPE, pass_fds=(sock.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C reaches the parent only, which forwards it once
            )  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(dataclasses.asdict(self.settings)).encode())
            proc.stdin.close()
            code = await proc.wait()
            if self.stopping:
                log.log(logging.INFO if code == 0 else logging.WARNING, "worker %d (pid %d) exited %d",
                        worker.index, proc.pid, code)  # fmt: skip
                return code
            worker.restarts += 1
            log.warning(
                "worker %d (pid %d) died (exit %d): starting it again (restart %d)",
                worker.index, proc.pid, code, worker.restarts,
            )  # fmt: skip
            if time.monotonic() - worker.started < _QUICK_DEATH:
                await asyncio.sleep(_QUICK_DEATH)


async def supervise(settings: Settings) -> int:
    return await Supervisor(settings).run()


# -- a worker ---------------------------------------------------------------------------------------------


async def _serve_worker(settings: Settings, fd: int, index: int, workers: int, path: str) -> int:
    remote = RemoteAdmission(settings, index)
    await remote.connect(path)
    gateway = WorkerGateway(settings, remote, workers)
    runner = make_runner(gateway.app(), settings, gateway.metrics)
    await runner.setup()
    # one round of engine checks before taking connections: a worker that knew no engine yet would label
    # its first requests' model "other" and route them blind while its siblings already know better
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2 * settings.health_timeout + 1):
            await gateway.health.check_all()
    await web.SockSite(runner, socket.socket(fileno=fd)).start()
    log.info("worker %d (pid %d) serving", index, os.getpid())
    try:
        await drain_on_signal(gateway, runner)
    finally:
        remote.final()
        await remote.close()
    return 0


def _stopped_early(signum: int, frame: object) -> None:
    """SIGTERM before this worker serves: nothing to drain."""
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    """``python -m gateway.workers FD INDEX WORKERS COORDINATOR``, the settings as JSON on stdin."""
    fd, index, workers, path = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    settings = Settings(**json.load(sys.stdin))
    logs.configure(settings.log_format, settings.log_level)
    signal.signal(signal.SIGTERM, _stopped_early)  # until the drain's own handler is in place
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the parent killed: drain and go too
    return uvloop.run(_serve_worker(settings, fd, index, workers, path))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
