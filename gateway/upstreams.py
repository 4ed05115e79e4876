"""The engines behind the gateway: their state, the choice of one per request, and the client of their checks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.client import KEEPALIVE_TIMEOUT
from gateway.settings import Settings, upstream_spec

log = logging.getLogger("gateway.upstreams")


@dataclass(eq=False)
class Upstream:
    """One engine and what the gateway knows of it."""

    url: str
    name: str = ""  # how logs, labels, /status and errors show it: never its credentials
    up: bool = False
    in_flight: int = 0
    fails: int = 0
    successes: int = 0
    last_error: str = ""
    last_check: float = 0.0
    models: dict[str, int] = field(default_factory=dict)  # served model id -> max_model_len

    def public(self) -> dict[str, object]:
        return {
            "url": self.url,
            "up": self.up,
            "in_flight": self.in_flight,
            "models": self.models,
            "last_error": self.last_error,
            "last_check_age_s": round(time.monotonic() - self.last_check, 3) if self.last_check else None,
        }


class UpstreamPool:
    """Ready engines first, fewest requests in flight first; hysteresis on health-check results."""

    def __init__(self, urls: list[str], fail_threshold: int, success_threshold: int) -> None:
        bases = (upstream_spec(url)[0] for url in urls)  # without their ;weight=W
        self.upstreams = [Upstream(url, url) for url in dict.fromkeys(bases)]
        self.fail_threshold = fail_threshold
        self.success_threshold = success_threshold
        self._served: dict[str, int] = {}  # read on every request: rebuilt only when a check changes it

    def candidates(self, model: str = "") -> list[Upstream]:
        """Every engine in the order to try: an engine not known to be up is still tried last."""
        if len(self.upstreams) == 1:
            return self.upstreams
        return sorted(self.upstreams, key=lambda u: (not u.up, u.in_flight))

    @property
    def any_up(self) -> bool:
        return any(u.up for u in self.upstreams)

    def models(self) -> dict[str, int]:
        """Every served model and its context window, as last seen by the health checks."""
        return self._served

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        """A request could not connect: stop sending it traffic until a health check succeeds again."""
        if upstream.up:
            log.warning("upstream %s marked down: %s", upstream.url, reason)
        upstream.up = False
        upstream.last_error = reason
        upstream.successes = 0
        upstream.fails = max(upstream.fails, self.fail_threshold)

    def record_check(self, upstream: Upstream, error: str | None, models: dict[str, int] | None) -> None:
        upstream.last_check = time.monotonic()
        if models and models != upstream.models:
            upstream.models = models
            self._served = {name: n for u in self.upstreams for name, n in u.models.items()}
        if error is None:
            upstream.fails = 0
            upstream.successes += 1
            first = not upstream.last_error and not upstream.up
            if not upstream.up and (first or upstream.successes >= self.success_threshold):
                log.info("upstream %s is up", upstream.url)
                upstream.up = True
            return
        upstream.successes = 0
        upstream.fails += 1
        upstream.last_error = error
        if upstream.up and upstream.fails >= self.fail_threshold:
            log.warning("upstream %s is down after %d failed checks: %s", upstream.url, upstream.fails, error)
            upstream.up = False


def client_session(settings: Settings) -> aiohttp.ClientSession:
    """The client of health checks and engine scrapes (the request path has its own, gateway.client),
    without aiohttp's defaults that break LLM traffic (see engine-facts)."""
    connector = aiohttp.TCPConnector(
        limit=0,  # admission control is the cap, not a silent pool limit of 100
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        ttl_dns_cache=10,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,  # generations run for hours; the 300 s default would cut them
        connect=settings.upstream_connect_timeout,
        sock_read=settings.upstream_read_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else None,
        timeout=timeout,
        auto_decompress=False,  # relay bytes as the engine sent them
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )
