"""The gateway application: its parts, its routes, and its lifecycle from start to drained exit."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway import health
from gateway.access.guard import Access
from gateway.accesslog import AccessLog
from gateway.admission import Admission
from gateway.errors import SERVER, GatewayError
from gateway.listener import ListenError, ListenerRunner, listen, make_runner, raise_open_files
from gateway.metrics.engine import EngineCollector, EngineSource
from gateway.metrics.gateway import GatewayMetrics
from gateway.metrics.gpu import GpuCollector
from gateway.metrics.host import HostCollector
from gateway.models import ModelList
from gateway.proxy import ENDPOINTS, Proxy
from gateway.routing.discovery import Discovery
from gateway.routing.router import Router
from gateway.settings import Settings, UpstreamSpec
from gateway.upstreams import Upstream, UpstreamPool, client_session

log = logging.getLogger("gateway")


class Gateway:
    """Every part of one gateway, built from its settings."""

    def __init__(self, settings: Settings, admission: Admission | None = None) -> None:
        """``admission``: another one than this process's own (a worker of ``--workers N`` asks its parent)."""
        self.settings = settings
        self.started = time.monotonic()
        # from drain_on_signal on: drain (False) or cut off what is left (True) as the first and the second signal
        # do, without counting as a signal (a worker's parent says so)
        self.stop_order: Callable[[bool], None] | None = None
        disable_created_metrics()  # *_created series double the output and no dashboard reads them
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.metrics = GatewayMetrics(self.registry)
        self.admission = admission or Admission(
            settings.max_concurrency,
            settings.max_queue,
            settings.queue_timeout,
            settings.max_tokens_in_flight,
            fair=bool(settings.api_key or settings.keys_file),
        )
        self.pool = UpstreamPool(settings.upstream, settings.health_fail_threshold, settings.health_success_threshold)
        self.engines = EngineCollector(map(self._source, self.pool.upstreams))
        self.router = Router(settings, self.pool, self.engines, self.metrics)
        self.discovery = Discovery.of(settings, self.set_engines, self.metrics)  # None: no DNS name to follow
        self.proxy = Proxy(settings, self.admission, self.pool, self.router, self.metrics)
        self.access = Access.from_settings(settings, self.admission, self.metrics)
        if self.access is not None:
            self.proxy.access = self.access
            self.proxy.on_finish.append(self.access.finish)
        self.gpu = GpuCollector()
        self.host = HostCollector()
        for collector in (self.gpu, self.host):
            self.registry.register(collector)
        self._state_gauges()
        self.health = health.HealthChecker(self)
        self.proxy.on_finish.append(self.health.count)
        self.access_log = AccessLog(settings.access_log) if settings.access_log != "off" else None
        if self.access_log is not None:
            self.proxy.on_finish.append(self.access_log)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the gateway has not started"
        return self._session

    def _state_gauges(self) -> None:
        m, a = self.metrics, self.admission
        readings: list[tuple[object, Callable[[], float]]] = [
            (m.in_flight, lambda: a.in_flight),
            (m.queue_depth, lambda: a.queue_depth),
            (m.tokens_in_flight, lambda: a.tokens_in_flight),
            (m.queue_limit, lambda: a.max_queue),
            (m.concurrency_limit, lambda: a.max_concurrency),
            (m.tokens_limit, lambda: a.max_tokens),
            (m.draining, lambda: self.proxy.draining),
            (m.read_timeout, lambda: self.settings.upstream_read_timeout),
            (m.oldest_age.labels("queued"), lambda: self.proxy.oldest_age("queued")),
            (m.oldest_age.labels("forwarded"), lambda: self.proxy.oldest_age("forwarded")),
        ]
        for gauge, read in readings:
            gauge.set_function(read)  # type: ignore[attr-defined]
        self._upstream_gauges(self.pool.upstreams)

    def _upstream_gauges(self, upstreams: Sequence[Upstream]) -> None:
        m = self.metrics
        for upstream in upstreams:
            m.upstream_up.labels(upstream.name).set_function(lambda u=upstream: u.up)
            m.upstream_in_flight.labels(upstream.name).set_function(lambda u=upstream: u.in_flight)

    def _source(self, upstream: Upstream) -> EngineSource:
        s = self.settings
        return EngineSource(upstream.url, s.engine_metrics_timeout, s.engine_metrics_max_age, upstream.name)

    def set_engines(self, specs: Sequence[UpstreamSpec]) -> None:
        """Make the engines these, in this order (README: Discovery): a new one joins the health checks, the
        scrape, routing and the metrics; a removed one gets no new request, its requests in flight finish, and its
        series leave /metrics once nothing is in flight to it.  The same list again changes nothing."""
        added, removed = self.pool.reconcile(specs)
        if added or removed:
            self.engines.follow(map(self._source, added), (u.url for u in removed))
            self._upstream_gauges(added)
        self.router.follow(added, removed)  # a changed weight too

    def background(self) -> dict[str, Coroutine[None, None, None]]:
        """What runs beside the serving for as long as the app lives: the engines' health checks and load reads
        (with ``--workers``, the parent's alone)."""
        work = {"health-checks": self.health.run(), "engine-load": self.router.run(self.session)}
        if self.discovery is not None:
            work["dns-discovery"] = self.discovery.run()
        return work

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the clients and the health checks live as long as the app."""
        self._session = client_session(self.settings)
        if self.discovery is not None:  # the names' engines before the first health check and request
            await self.discovery.refresh()
        tasks = [asyncio.create_task(work, name=name) for name, work in self.background().items()]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._session.close()
        self.proxy.client.close()
        self.gpu.close()

    async def metrics_page(self, request: web.Request) -> web.Response:
        """One scrape: the gateway's series, each engine's vllm:* series, GPUs and host."""
        await self.engines.refresh(self.session)
        body = generate_latest(self.registry) + self.engines.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    def app(self) -> web.Application:
        # client_max_size guards only read()/json(); the proxy counts body bytes itself.
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app[GATEWAY] = self
        app.cleanup_ctx.append(self.lifecycle)
        app.on_response_prepare.append(_server_header)
        if self.access_log is not None:
            app.cleanup_ctx.append(self.access_log.lifecycle)
        handle = self.proxy.handle
        probes, admin = self._routes()
        app.router.add_routes(probes)
        if self.settings.metrics_port:
            app.cleanup_ctx.append(lambda _: self._admin_listener(admin))
        else:
            app.router.add_routes(admin)
        if self.access is not None:
            app.cleanup_ctx.append(self.access.lifecycle)
            app.on_response_prepare.append(self.access.add_headers)
        handlers = {path: handle for path in ENDPOINTS} | {"/v1/models": ModelList(self.proxy, self.pool).handle}
        for path, handler in handlers.items():  # the OpenAI routes, and vLLM's own outside /v1: one dict lookup
            app.router.add_route("*", path, handler)
        app.router.add_route("*", "/v1/{tail:.*}", handle)  # any other /v1 route the engine may have
        app.router.add_route("*", "/{tail:.*}", self.proxy.not_found)
        return app

    def _routes(self) -> tuple[list[web.RouteDef], list[web.RouteDef]]:
        """The open probes, and /metrics and /status: for admin keys only when keys are configured."""
        routes = [*health.handlers(self), web.get("/metrics", self.metrics_page)]
        probes = [r for r in routes if r.path.startswith("/health")]
        admin = [r for r in routes if not r.path.startswith("/health")]
        if self.access is not None and not self.settings.metrics_port:
            admin = [web.RouteDef(r.method, r.path, self.access.admin_only(r.handler), r.kwargs) for r in admin]
        return probes, admin

    async def _admin_listener(self, routes: list[web.RouteDef]) -> AsyncIterator[None]:
        """--metrics-port: /metrics and /status on their own listener, which operators keep in the cluster."""
        app = web.Application()
        app.on_response_prepare.append(_server_header)
        app.router.add_routes(routes)
        runner = make_runner(app)
        await runner.setup()
        await self._admin_site(runner).start()
        yield
        await runner.cleanup()

    async def signalled(self, runner: ListenerRunner) -> None:
        """A drain that a signal to this process began: one process keeps its port and answers 503 ``draining``
        (a load balancer's health checks see it go), a worker of ``--workers`` closes it (see WorkerGateway)."""

    def _admin_site(self, runner: web.BaseRunner) -> web.BaseSite:
        """Where --metrics-port listens (a worker of --workers: on the socket its parent opened for all)."""
        return web.TCPSite(runner, self.settings.metrics_host, self.settings.metrics_port)


GATEWAY = web.AppKey("gateway", Gateway)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: glm-gateway`` on every answer, the engine's included: no versions to fingerprint."""
    response.headers["Server"] = SERVER


_CUT_GRACE = 1.0  # seconds the requests cut at the drain deadline have to write their error


async def serve(settings: Settings, announce: Callable[[str], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain: not ready, 503 to new requests, in-flight ones finish.
    Raises ``ListenError`` when the port cannot be opened."""
    raise_open_files(settings.max_connections)
    gateway = Gateway(settings)
    runner = make_runner(gateway.app(), settings, gateway.metrics)
    await runner.setup()
    try:
        await listen(runner, settings.host, settings.port)
    except ListenError:
        await runner.cleanup()
        raise
    url = f"http://{settings.host}:{settings.port}"
    log.info("glm-gateway listening on %s, upstreams %s", url, ", ".join(u.name for u in gateway.pool.upstreams))
    if announce is not None:
        announce(url)
    await drain_on_signal(gateway, runner)
    return 0


async def drain_on_signal(gateway: Gateway, runner: ListenerRunner) -> None:
    """First signal (or ``gateway.stop_order``): draining; bodies still arriving are answered 503 (not admitted,
    so nothing is lost).  At ``--drain-timeout`` or the second signal (or order to cut), each request still at an
    engine is cut there and then:
    a stream ends with an error event and [DONE], a request waiting for its answer gets a 502."""
    gc.freeze()  # what was built before serving lives as long as the process: kept out of every collection
    # The request path leaves no cyclic garbage (tests/test_relay.py), yet a youngest-generation collection
    # ran every 700 allocations and walked every live request's objects: 2-9% of the CPU of short streams.
    gc.set_threshold(10_000, 10, 10)
    loop = asyncio.get_running_loop()
    stop, hard = asyncio.Event(), asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        if signals:  # (a drain that began by order, not by a signal, has had none)
            log.warning("second %s: cutting off %d requests", signal.Signals(signum).name, gateway.proxy.active)
            hard.set()
        signals.append(signum)
        stop.set()

    def order(cut: bool) -> None:
        if cut and not hard.is_set():
            log.warning("told to stop now: cutting off %d requests", gateway.proxy.active)
            hard.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    gateway.stop_order = order
    try:
        await stop.wait()
        gateway.proxy.draining = True
        if signals:  # (not an order)
            await gateway.signalled(runner)
        cut = runner.listener.cut_bodies(
            GatewayError("draining", "The gateway is shutting down. Retry on another instance.", retry_after=1)
        )
        if cut:
            log.info("draining: %d requests still sending their body answered 503", cut)
        timeout = gateway.settings.drain_timeout
        log.info("draining %d requests for up to %g s", gateway.proxy.active, timeout)
        waits = [asyncio.ensure_future(gateway.proxy.idle.wait()), asyncio.ensure_future(hard.wait())]
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if gateway.proxy.active:
            log.warning("drain ended with %d requests still running: cutting them off", gateway.proxy.active)
            gateway.proxy.client.abort("the gateway is shutting down")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CUT_GRACE):  # the cut streams write their last events
                    await gateway.proxy.idle.wait()
        else:
            log.info("drained")
    finally:  # (gateway.stop_order stays: an order that comes after the drain finds nothing left to stop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
