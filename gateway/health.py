"""Liveness, readiness with reasons, the seed's /health JSON, /status, and the engines' health checks."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway import __version__
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
        s = gateway.settings
        self.timeout = aiohttp.ClientTimeout(total=s.health_timeout)

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
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
                    raise RuntimeError(f"/health answered {resp.status}")
            async with session.get(upstream.url + "/v1/models", timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"/v1/models answered {resp.status}")
                cards = (await resp.json()).get("data") or []
            models = {
                c["id"]: int(c.get("max_model_len") or DEFAULT_CONTEXT_WINDOW)
                for c in cards
                if isinstance(c, dict) and "id" in c
            }
            if not models:
                raise RuntimeError("serves no model")
        except (
            aiohttp.ClientError,
            TimeoutError,
            RuntimeError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            self.gw.pool.record_check(upstream, f"{exc.__class__.__name__}: {exc}".rstrip(": "), None)
            return
        self.gw.pool.record_check(upstream, None, models)
        self.gw.metrics.declare(models)

    def reasons(self) -> list[str]:
        """Why the gateway is not ready; empty when it is."""
        out = []
        if self.gw.proxy.draining:
            out.append("draining: the gateway is shutting down")
        if not self.gw.pool.any_up:
            out.extend(f"upstream {u.url} is down: {u.last_error or 'not checked yet'}" for u in self.gw.pool.upstreams)
        out.extend(self.gpu_faults)
        return out


def _json(body: dict[str, Any], ready: bool) -> web.Response:
    return web.json_response(body, status=200 if ready else 503)


async def live(request: web.Request) -> web.Response:
    """200 while the event loop answers; never asks the engine (a busy engine must not restart us)."""
    return web.json_response({"status": "alive"})


def handlers(gw: Gateway) -> list[web.RouteDef]:
    async def ready(request: web.Request) -> web.Response:
        reasons = gw.health.reasons()
        return _json({"status": "ready" if not reasons else "not ready", "reasons": reasons}, not reasons)

    async def health(request: web.Request) -> web.Response:
        """The seed tutorial's JSON, plus upstream states; status code as readiness."""
        reasons = gw.health.reasons()
        total, failed = gw.proxy.requests_total, gw.proxy.requests_failed
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
        return _json(body, not reasons)

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
            "routing": {"policy": gw.settings.routing, "waiting_for_kv_room": gw.router.waiting},
            "upstreams": [{**u.public(), "routing": gw.router.public(u)} for u in gw.pool.upstreams],
            "gpus": gw.gpu.snapshot(),
            "host": gw.host.snapshot(),
        }
        return web.json_response(body)

    return [
        web.get("/health/live", live),
        web.get("/health/ready", ready),
        web.get("/health", health),
        web.get("/status", status),
    ]
