"""``--workers N``: one parent owns the listening socket and the coordination, and supervises N worker
processes that serve it (each a whole gateway whose admission, engine state and breakers are the parent's); a
dead worker is restarted."""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from gateway import logs
from gateway.access.limits import LocalStore, RedisStore
from gateway.app import Gateway, drain_on_signal
from gateway.coordinator import Authority, ParentLink, signal_self
from gateway.enginehost import SharedBreaker, apply_view
from gateway.errors import GatewayError
from gateway.headers import request_id
from gateway.listener import ListenError, ListenerRunner, make_runner, raise_open_files
from gateway.metrics.merge import Family, families
from gateway.routing.load import EngineState
from gateway.settings import Settings, UpstreamSpec

log = logging.getLogger("gateway.workers")

_QUICK_DEATH = 1.0  # a worker that dies sooner than this after its start waits as long before its restart
_PR_SET_PDEATHSIG = 1
# A worker's tokens at an engine reach the others when they moved by 1/(_KV_DRIFT x workers) of its admitted KV
# capacity (capacity x --kv-headroom) since they last did (so the room any worker sees is off by under
# 1/_KV_DRIFT of that), went back to none, or, once the room free there is under 1/_KV_CLOSE of it, whenever they
# differ from what the others last heard (checked as this worker's own change and as news of the others' come).
_KV_DRIFT = 16
_KV_CLOSE = 4


class WorkerGateway(Gateway):
    """One worker's gateway: admission asked of the parent; the engines as the parent's checks, load reads and
    breakers see them; the keys read again when the parent says; /metrics and /status answer for all workers."""

    def __init__(self, settings: Settings, parent: ParentLink, workers: int, admin_fd: int) -> None:
        super().__init__(settings, parent)  # type: ignore[arg-type]
        self.parent = parent
        self.admin_fd = admin_fd  # the --metrics-port socket, shared as the port is; -1 without one
        self.discovery = None  # the parent resolves the engines' names, once for the host
        parent.series = self.series
        for collector in (self.gpu, self.host):  # the parent collects them, once for the host
            self.registry.unregister(collector)
        if self.access is not None:
            self.access.watch = False  # the parent watches the keys file and takes SIGHUP
            parent.on_keys = self.access.reload
            store = self.access.limiter.store  # without Redis a key's rate is split between the workers
            if isinstance(store, RedisStore):
                store.fallback = LocalStore(settings.replicas * workers)
            else:
                self.access.limiter.store = LocalStore(workers)
        self._share_breakers()
        self.router.held = self._held
        self._drift = _KV_DRIFT * workers
        self._told: dict[str, int] = {}  # engine URL -> this worker's tokens there as the parent last heard them
        parent.tokens = self._tokens
        parent.on_tokens = self._others
        parent.on_engines = self.apply
        parent.on_stop = self._stop
        self.apply(parent.engines)

    async def signalled(self, runner: ListenerRunner) -> None:
        """A SIGTERM of this worker's own, not its parent's word: the other workers serve on, so this one stops
        taking connections (they take the new ones) and drains; its parent starts it again once it exits."""
        for site in list(runner.sites):
            await site.stop()

    def _stop(self, cut: bool) -> None:
        """The parent's word to drain or cut off, or its end (a drain): once serving, as its signals would be."""
        (self.stop_order or signal_self)(cut)

    def background(self) -> dict[str, Coroutine[None, None, None]]:
        return {}  # the parent checks the engines and reads their load, once for the host

    def _share_breakers(self) -> None:
        s = self.settings
        for upstream, state in self.router.states.items():
            if not isinstance(state.breaker, SharedBreaker):
                state.breaker = SharedBreaker(upstream, self.parent.observed, s.breaker_failures, s.breaker_cooldown)

    def _held(self, state: EngineState) -> None:
        """Its tokens at an engine whose KV room is admitted moved, or the room did: the other workers must count
        them (see _KV_DRIFT)."""
        now = time.monotonic()
        capacity = state.capacity(now)
        moved = state.tokens - self._told.get(state.upstream.url, 0)
        if capacity and moved:
            if not state.tokens or abs(moved) * self._drift >= capacity or state.room(now) * _KV_CLOSE < capacity:
                self.parent.held()

    def _tokens(self) -> dict[str, int]:
        self._told = {u.url: state.tokens for u, state in self.router.states.items()}
        return self._told

    def apply(self, state: dict[str, Any]) -> None:
        """The parent's engine state: the engines (as its DNS discovery found them), each one's health, models,
        load view and breaker, and the GPU faults."""
        self.set_engines([UpstreamSpec(v["url"], v["name"], v["weight"]) for v in state["engines"]])
        self._share_breakers()
        by_url = {u.url: u for u in self.pool.upstreams}
        served = False
        for view in state["engines"]:
            upstream = by_url.get(view["url"])
            if upstream is not None:
                served |= apply_view(upstream, self.router.states[upstream], view)
        if served:
            self.pool.reindex()
            self.metrics.declare(self.pool.models())
        self.health.gpu_faults = state["gpu_faults"]
        self._others(state["held"])

    def _others(self, held: dict[str, dict[str, int]]) -> None:
        """The tokens the other workers have in flight to each engine; room they freed lets waiting requests in."""
        me = str(self.parent.index)
        for upstream, state in self.router.states.items():
            state.others = sum(tokens for worker, tokens in held.get(upstream.url, {}).items() if worker != me)
            self._held(state)  # the room near its end: what this worker holds unsaid counts now
        self.router.refreshed()

    def series(self) -> list[Family]:
        """This worker's series for the parent's merge: the gateway's, and its process_* and python_*."""
        return families(self.registry.collect(), str(self.parent.index))

    async def metrics_page(self, request: web.Request) -> web.Response:
        """The series of every worker merged by the parent, with the GPU, host and engine series it collects."""
        try:
            body = await self.parent.metrics()
        except GatewayError as exc:  # the parent is gone: this worker drains
            return exc.response(request_id(request))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    def _admin_site(self, runner: web.BaseRunner) -> web.BaseSite:
        return web.SockSite(runner, socket.socket(fileno=self.admin_fd))

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
            try:
                parent = await self.parent.status()
            except GatewayError as exc:  # the parent is gone: this worker drains
                return exc.response(request_id(request))
            body |= {
                "admission": parent["admission"], "worker": self.parent.index, "workers": parent["workers"],
                "engine_checks": parent["engine_checks"],
            }  # fmt: skip
            return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json")

        return web.RouteDef(route.method, route.path, status, route.kwargs)


# -- the parent -------------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise ListenError.of(host, port, exc) from None
    sock.set_inheritable(True)
    return sock


@dataclasses.dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0


class Supervisor:
    """Starts the workers, restarts one that dies (logged, counted in /status), tells them to drain on SIGTERM and
    SIGINT (to cut off on the second), takes SIGHUP, and exits 0 when every worker has drained and exited 0."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [_Worker(i) for i in range(settings.worker_count)]
        self.authority = Authority(settings, self.describe)
        self.sockets: list[socket.socket] = []  # the port's (and --metrics-port's), which every worker inherits

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for w in self.workers:
            link = self.authority.links.get(w.index)
            out.append({
                "index": w.index, "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                "uptime_seconds": round(now - w.started, 3), "connected": link is not None,
                "admitted": link.admitted if link else 0, "from_spare": link.from_spare if link else 0,
                "spare_slots": link.spare[0] if link else 0,
            })  # fmt: skip
        return out

    async def run(self, announce: Callable[[str], None] | None = None) -> int:
        raise_open_files(self.settings.max_connections)
        s = self.settings
        self.sockets = [_bind(s.host, s.port), *([_bind(s.metrics_host, s.metrics_port)] if s.metrics_port else [])]
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="glm-gateway-") as tmp:
            path = os.path.join(tmp, "coordinator.sock")
            server = await self.authority.serve(path)
            watch = asyncio.create_task(self.authority.watch_keys(), name="keys-file-watch")
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop, signum)
            loop.add_signal_handler(signal.SIGHUP, self.authority.reload)
            async with self.authority.host.running():  # the engines checked once for the host, here
                kept = [asyncio.create_task(self._keep(w, path)) for w in self.workers]
                url = f"http://{self.settings.host}:{self.settings.port}"
                log.info("glm-gateway listening on %s with %d workers", url, len(self.workers))
                if announce is not None:
                    announce(url)
                codes = await asyncio.gather(*kept)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            watch.cancel()
            server.close()
        for sock in self.sockets:
            sock.close()
        log.info("every worker exited (%s)", ", ".join(map(str, codes)))
        return 0 if not any(codes) else 1

    def _stop(self, signum: int) -> None:
        if not self.authority.stopping:
            log.info("%s: draining %d workers", signal.Signals(signum).name, len(self.workers))
        # a second one cuts the workers' requests off, as in one process; a worker still starting is not
        # connected yet, and is told as it connects
        self.authority.stop_workers(cut=self.authority.stopping)
        for sock in self.sockets:  # no worker starts again: the port stays open only while workers keep it
            sock.close()

    async def _keep(self, worker: _Worker, path: str) -> int:
        """Run the worker, again each time it dies; it inherits the port's socket (and --metrics-port's)."""
        fds = [sock.fileno() for sock in self.sockets]
        listen, admin = fds[0], fds[1] if len(fds) > 1 else -1
        while True:
            worker.started = time.monotonic()
            proc = worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.workers", str(listen), str(admin), str(worker.index),
                str(len(self.workers)), path, stdin=asyncio.subprocess.PIPE, pass_fds=fds,
                start_new_session=True,  # a terminal's Ctrl-C reaches the parent only, which forwards it once
            )  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(dataclasses.asdict(self.settings)).encode())
            proc.stdin.close()
            code = await proc.wait()
            if self.authority.stopping:
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
                if self.authority.stopping:  # (meanwhile)
                    return code


async def supervise(settings: Settings) -> int:
    return await Supervisor(settings).run()


# -- a worker ---------------------------------------------------------------------------------------------


async def _serve_worker(settings: Settings, fd: int, admin_fd: int, index: int, workers: int, path: str) -> int:
    parent = ParentLink(settings, index)
    await parent.connect(path)
    # From here the link's end tells this worker that the parent is gone: a drain.  The parent-death signal would
    # add several SIGTERMs (one as each of the dying parent's threads that the worker passes to exits), and a
    # second SIGTERM cuts every request off.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 0)
    # the parent's engine state before taking connections: a worker that knew no engine yet would label its
    # first requests' model "other" and route them blind while its siblings already know better
    await parent.known.wait()
    gateway = WorkerGateway(settings, parent, workers, admin_fd)
    runner = make_runner(gateway.app(), settings, gateway.metrics)
    await runner.setup()
    await web.SockSite(runner, socket.socket(fileno=fd)).start()
    log.info("worker %d (pid %d) serving", index, os.getpid())
    try:
        await drain_on_signal(gateway, runner)
    finally:
        parent.final()
        await parent.close()
    return 0


def _stopped_early(signum: int, frame: object) -> None:
    """SIGTERM before this worker serves: nothing to drain."""
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    """``python -m gateway.workers FD ADMIN_FD INDEX WORKERS COORDINATOR``, the settings as JSON on stdin (ADMIN_FD:
    the --metrics-port socket, -1 without one)."""
    fd, admin_fd, index, workers, path = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    settings = Settings(**json.load(sys.stdin))
    logs.configure(settings.log_format, settings.log_level)
    signal.signal(signal.SIGTERM, _stopped_early)  # until the drain's own handler is in place
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent takes SIGHUP and tells the workers
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the parent killed before the link is up: go too
    return uvloop.run(_serve_worker(settings, fd, admin_fd, index, workers, path))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
