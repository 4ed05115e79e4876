"""Liveness, readiness with reasons, the /health JSON, /status, and the engines' health checks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway import __version__
from gateway.client import LOCAL_EXHAUSTION
from gateway.errors import ERROR_TYPES
from gateway.exchange import Exchange
from gateway.proxy import DEFAULT_CONTEXT_WINDOW
from gateway.upstreams import Upstream

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.health")


class HealthChecker:
    """Checks every engine's /health and /v1/models every ``health_interval`` seconds."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.gpu_faults: list[str] = []
        self.requests = 0
        self.failed = 0  # answered 5xx, by the engine or the gateway
        s = gateway.settings
        self.timeout = aiohttp.ClientTimeout(total=s.health_timeout)
        self.after: Callable[[], None] | None = None  # after each round (the parent of --workers sends it on)

    async def run(self) -> None:
        """A round of checks every --health-interval seconds."""
        while True:
            try:
                await self.check_all()
                if self.after is not None:
                    self.after()
            except Exception:  # a bug here must not freeze every engine's state for good
                log.exception("health check round failed")
            await asyncio.sleep(self.gw.settings.health_interval)

    async def check_all(self) -> None:
        session = self.gw.session
        await asyncio.gather(*(self._check(session, u) for u in self.gw.pool.upstreams))
        self.gpu_faults = self.gw.gpu.faults()

    async def _check(self, session: aiohttp.ClientSession, upstream: Upstream) -> None:
        try:
            async with session.get(upstream.url + "/health", timeout=self.timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    raise _Unhealthy(f"its /health answered {resp.status}")
            async with session.get(upstream.url + "/v1/models", timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise _Unhealthy(f"its /v1/models answered {resp.status}")
                cards = [c for c in (await resp.json()).get("data") or [] if isinstance(c, dict) and "id" in c]
            models = {str(c["id"]): int(c.get("max_model_len") or DEFAULT_CONTEXT_WINDOW) for c in cards}
            if not models:
                raise _Unhealthy("it serves no model")
        except _Unhealthy as exc:
            self.gw.pool.record_check(upstream, str(exc), None)
            return
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno in LOCAL_EXHAUSTION:  # the gateway's own failure: says nothing of the engine
                log.warning("health check of %s skipped: %s", upstream.name, exc.os_error.strerror)
                return
            self.gw.pool.record_check(upstream, f"cannot connect ({exc.os_error.strerror or exc.os_error})", None)
            return
        except aiohttp.ClientError as exc:
            self.gw.pool.record_check(upstream, f"the connection failed ({exc or exc.__class__.__name__})", None)
            return
        except TimeoutError:
            self.gw.pool.record_check(upstream, f"no answer within {self.timeout.total:g} s", None)
            return
        except (ValueError, KeyError, TypeError, AttributeError):
            self.gw.pool.record_check(upstream, "its /v1/models answered what is not a list of models", None)
            return
        upstream.cards = cards  # GET /v1/models answers them as the engine sent them
        self.gw.pool.record_check(upstream, None, models)
        self.gw.metrics.declare(models)

    def count(self, ex: Exchange) -> None:
        """Every finished request, for /health's success rate: only what the service failed counts against it
        (a 5xx, or a stream that broke off after its 200), not the client's mistakes (4xx) nor clients that left."""
        self.requests += 1
        if ex.status >= 500 or (ex.error_type is not None and ERROR_TYPES[ex.error_type][0] >= 500):
            self.failed += 1

    def reasons(self) -> list[str]:
        """Why the gateway is not ready; empty when it is."""
        out = []
        if self.gw.proxy.draining:
            out.append("draining: the gateway is shutting down")
        if not self.gw.pool.any_up:
            for u in self.gw.pool.upstreams:
                out.append(f"upstream {u.name} is down: {u.last_error or 'not checked yet'}")
        out.extend(self.gpu_faults)
        return out


class _Unhealthy(Exception):
    """An engine's check answered, but not as a ready engine does."""


def _json(body: dict[str, Any], status: int = 200, indent: int | None = None) -> web.Response:
    """JSON ending with a newline (``curl a; curl b`` stays readable); indented for pages people read."""
    return web.Response(text=json.dumps(body, indent=indent) + "\n", status=status, content_type="application/json")


async def live(request: web.Request) -> web.Response:
    """200 while the event loop answers; never asks the engine (a busy engine must not restart us)."""
    return _json({"status": "alive"})


def handlers(gw: Gateway) -> list[web.RouteDef]:
    async def ready(request: web.Request) -> web.Response:
        reasons = gw.health.reasons()
        return _json({"status": "ready" if not reasons else "not ready", "reasons": reasons}, 503 if reasons else 200)

    async def health(request: web.Request) -> web.Response:
        """The JSON of the monitoring tutorial for GLM-4-9B-Chat-1M, plus upstream states; status code as
        readiness.  ``failed`` and ``success_rate`` count what the service failed (5xx), not client errors."""
        reasons = gw.health.reasons()
        total, failed = gw.health.requests, gw.health.failed
        body = {
            "status": "healthy" if not reasons else "unhealthy",
            "reasons": reasons,
            "timestamp": time.time(),
            "uptime_seconds": round(time.monotonic() - gw.started, 3),
            "model_loaded": bool(gw.pool.models()),
            "models": sorted(gw.pool.models()),
            "gpu_available": gw.gpu.available,
            "system_resources": gw.host.snapshot(),
            "requests": {
                "total": total,
                "failed": failed,
                "success_rate": round((total - failed) / total, 6) if total else 1.0,
            },
            "upstreams": [u.public() for u in gw.pool.upstreams],
        }
        return _json(body, 503 if reasons else 200, indent=2)

    async def status(request: web.Request) -> web.Response:
        """A detailed view for people: settings, upstreams, queue and budget, GPUs, host."""
        reasons = gw.health.reasons()
        body = {
            "version": __version__,
            "ready": not reasons,
            "reasons": reasons,
            "draining": gw.proxy.draining,
            "uptime_seconds": round(time.monotonic() - gw.started, 3),
            "settings": gw.settings.public(),
            "context_window": gw.proxy.context_window(),
            "admission": gw.admission.stats(),
            "routing": {
                "policy": gw.settings.routing,
                "waiting_for_kv_room": gw.router.waiting,
                "leaving": gw.router.leaving(),  # engines removed from the pool, their requests still running
            },
            "upstreams": [{**u.public(), "routing": gw.router.public(u)} for u in gw.pool.upstreams],
            "relay": gw.proxy.relay.stats(),
            "gpus": gw.gpu.snapshot(),
            "host": gw.host.snapshot(),
        }
        return _json(body, indent=2)

    return [
        web.get("/health/live", live),
        web.get("/health/ready", ready),
        web.get("/health", health),
        web.get("/status", status),
    ]
