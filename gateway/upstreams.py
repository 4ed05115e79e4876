"""The engines behind the gateway: their state, the choice of one per request, and the client of their checks."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.client import KEEPALIVE_TIMEOUT
from gateway.errors import GatewayError
from gateway.settings import Settings, UpstreamSpec, parse_upstream, redact

log = logging.getLogger("gateway.upstreams")


@dataclass(eq=False)
class Upstream:
    """One engine and what the gateway knows of it."""

    url: str  # where to connect, credentials included: never shown
    name: str = ""  # how logs, labels, /status and errors show it: never its credentials
    weight: float = 1.0  # its routing share against a weight-1 engine
    up: bool = False
    in_flight: int = 0
    fails: int = 0
    successes: int = 0
    last_error: str = ""
    last_check: float = 0.0
    models: dict[str, int] = field(default_factory=dict)  # served model id -> max_model_len
    cards: list[dict[str, Any]] = field(default_factory=list)  # its /v1/models entries, as the engine sent them

    def public(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": redact(self.url),
            "up": self.up,
            "in_flight": self.in_flight,
            "models": self.models,
            "last_error": self.last_error,
            "last_check_age_s": round(time.monotonic() - self.last_check, 3) if self.last_check else None,
        }


class UpstreamPool:
    """The engines, which serve which model, and their state from health checks (with hysteresis)."""

    def __init__(self, specs: list[str], fail_threshold: int, success_threshold: int) -> None:
        self.fail_threshold = fail_threshold
        self.success_threshold = success_threshold
        self.upstreams: list[Upstream] = []
        self._served: dict[str, int] = {}  # read on every request: rebuilt only when a check changes it
        self._serving: dict[str, list[Upstream]] = {}  # model -> the engines that serve it
        self._unknown: list[Upstream] = []  # engines whose models no check has seen yet
        parsed = [parse_upstream(s) for s in specs]
        for spec in parsed:
            if spec.stripped_v1:
                log.warning(
                    "upstream %s: the /v1 at the end of its URL was removed (the gateway adds /v1/... itself); "
                    "give the engine's base URL",
                    spec.name,
                )
        self.reconcile(parsed)

    def reconcile(self, specs: Sequence[UpstreamSpec]) -> tuple[list[Upstream], list[Upstream]]:
        """Make the engines these, in this order, one per URL: an engine still listed keeps its state (and takes
        a changed weight); a new URL, or a new name for one, is a new engine.  Returns the engines added and
        those removed: a removed one gets no new requests, and its requests in flight keep their reference."""
        kept, added = [], []
        current = {u.url: u for u in self.upstreams}
        for spec in {s.url: s for s in specs}.values():
            upstream = current.get(spec.url)
            if upstream is None or upstream.name != spec.name:
                upstream = Upstream(spec.url, spec.name, spec.weight)
                added.append(upstream)
                weight = f", weight {spec.weight:g}" if spec.weight != 1 else ""
                log.info("upstream %s at %s%s: checking it", spec.name, redact(spec.url), weight)
            upstream.weight = spec.weight
            kept.append(upstream)
        removed = [u for u in self.upstreams if all(u is not k for k in kept)]
        for upstream in removed:
            log.info("upstream %s left: no new requests; %d in flight finish there", upstream.name, upstream.in_flight)
        self.upstreams = kept
        self.reindex()
        return added, removed

    def serving(self, model: str) -> list[Upstream]:
        """The engines a request for ``model`` may go to: those serving it (a request naming none gets the first
        served model, as vLLM serves it), engines not checked yet when none is known to; every engine while no
        model list is known.  GatewayError 404 when no engine serves it."""
        if not self._served:
            return self.upstreams
        serving = self._serving.get(model or next(iter(self._served)))
        if serving is None:
            serving = self._unknown
        if not serving:
            raise GatewayError("model_not_found", f"The model `{model}` does not exist.", param="model")
        return serving

    @property
    def any_up(self) -> bool:
        return any(u.up for u in self.upstreams)

    def models(self) -> dict[str, int]:
        """Every served model and its context window, as last seen by the health checks."""
        return self._served

    def cards(self) -> list[dict[str, Any]]:
        """``/v1/models``: the ready engines' model cards as they sent them, each model once (the first
        engine's card)."""
        out: dict[str, dict[str, Any]] = {}
        for upstream in self.upstreams:
            if upstream.up:
                for card in upstream.cards:
                    out.setdefault(card["id"], card)
        return list(out.values())

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        """A request could not connect: stop sending it traffic until a health check succeeds again."""
        if upstream.up:
            log.warning("upstream %s is down: %s", upstream.name, reason)
        upstream.up = False
        upstream.last_error = reason
        upstream.successes = 0
        upstream.fails = max(upstream.fails, self.fail_threshold)

    def record_check(self, upstream: Upstream, error: str | None, models: dict[str, int] | None) -> None:
        """One health check's outcome: ``error`` None with the engine's models, or why it failed."""
        upstream.last_check = time.monotonic()
        if models and models != upstream.models:
            upstream.models = models
            self.reindex()
        if error is None:
            upstream.fails = 0
            upstream.successes += 1
            first = not upstream.last_error and not upstream.up
            if not upstream.up and (first or upstream.successes >= self.success_threshold):
                served = ", ".join(f"{m} (max_model_len {n})" for m, n in upstream.models.items())
                log.info("upstream %s is up, serving %s", upstream.name, served)
                upstream.up = True
            return
        upstream.successes = 0
        upstream.fails += 1
        if not upstream.up and not upstream.last_error:  # its first check failed: say so now, not 3 checks on
            log.warning("upstream %s is not ready: %s", upstream.name, error)
        elif upstream.up and upstream.fails >= self.fail_threshold:
            log.warning("upstream %s is down after %d failed checks: %s", upstream.name, upstream.fails, error)
            upstream.up = False
        upstream.last_error = error

    def reindex(self) -> None:
        """Which engine serves which model, again: after an engine's models changed (a check, or the parent's)."""
        self._served = {name: n for u in self.upstreams for name, n in u.models.items()}
        self._serving = {name: [u for u in self.upstreams if name in u.models] for name in self._served}
        self._unknown = [u for u in self.upstreams if not u.models]


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
