"""The engines' own ``vllm:*`` series, fetched on scrape (at most once a second) and labelled by upstream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger("gateway.engine_metrics")

PREFIX = "vllm:"


def relabel(text: str, upstream: str) -> list[Metric]:
    """Keep the ``vllm:*`` families, drop ``_created`` samples, add ``upstream`` to every sample."""
    families = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue  # process_*, python_*, http_*: the gateway's own would collide
        out = Metric(family.name, family.documentation, family.type, family.unit)
        out.samples = [
            Sample(s.name, {**s.labels, "upstream": upstream}, s.value, s.timestamp, s.exemplar)
            for s in family.samples
            if not s.name.endswith("_created")
        ]
        families.append(out)
    return families


class EngineSource:
    """One engine's /metrics, cached for ``max_age`` seconds; concurrent scrapes share one fetch."""

    def __init__(self, url: str, timeout: float, max_age: float) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_age = max_age
        self.families: list[Metric] = []
        self.fetched_at = -float("inf")
        self._fetch: asyncio.Task[None] | None = None

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        if time.monotonic() - self.fetched_at < self.max_age:
            return
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.ensure_future(self._load(session))
        await asyncio.shield(self._fetch)

    async def _load(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(
                self.url + "/metrics", headers={"Accept": "text/plain"}, timeout=self.timeout
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                text = await resp.text()
            self.families = relabel(text, self.url)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
            log.debug("engine metrics from %s unavailable: %r", self.url, exc)
            self.families = []  # absent, not stale: gateway_upstream_up tells why
        self.fetched_at = time.monotonic()


class EngineCollector(Collector):
    """Merges the cached families of every engine so each family is written once.

    The text is rendered once per fetch, not once per scrape: a vLLM engine exports hundreds of
    samples and several scrapers may ask every second.
    """

    def __init__(self, sources: Iterable[EngineSource]) -> None:
        self.sources = list(sources)
        self._text = b""
        self._rendered_from: tuple[float, ...] = ()

    def exposition(self) -> bytes:
        """The merged families in the classic text format, as of the last fetches."""
        fetched = tuple(s.fetched_at for s in self.sources)
        if fetched != self._rendered_from:
            self._text = generate_latest(self)  # type: ignore[arg-type]
            self._rendered_from = fetched
        return self._text

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(s.refresh(session) for s in self.sources))

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for source in self.sources:
            for family in source.families:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                into.samples.extend(family.samples)
        yield from merged.values()
