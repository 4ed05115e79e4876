"""The engines' own ``vllm:*`` series, fetched on scrape (at most once a second) and labelled by upstream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger("gateway.engine_metrics")

PREFIX = "vllm:"


@dataclass
class Family:
    """One metric family of the classic text format: its HELP and TYPE lines and its sample lines."""

    header: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def relabel(text: str, upstream: str) -> dict[str, Family]:
    """Keep the ``vllm:*`` families, drop ``_created`` samples, add ``upstream`` to every sample.

    Works on lines, not parsed samples: names, types, values and label order stay as vLLM wrote
    them, and a few hundred lines take a fraction of a millisecond (prometheus_client's parser
    takes several, on the event loop).
    """
    label = 'upstream="' + upstream.replace("\\", "\\\\").replace('"', '\\"') + '"'
    families: dict[str, Family] = {}
    family: Family | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue
            name = parts[2]
            family = families.setdefault(name, Family()) if name.startswith(PREFIX) else None
            if family is not None:
                family.header.append(line)
            continue
        if family is None or not line:
            continue  # process_*, python_*, http_*: the gateway's own would collide
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and brace < space:
            name = line[:brace]
            rest = line[brace + 1 :]
            line = f"{name}{{{label}{'' if rest.startswith('}') else ','}{rest}"
        else:
            name = line[:space]
            line = f"{name}{{{label}}}{line[space:]}"
        if not name.endswith("_created"):
            family.samples.append(line)
    return families


class EngineSource:
    """One engine's /metrics, cached for ``max_age`` seconds; concurrent scrapes share one fetch."""

    def __init__(self, url: str, timeout: float, max_age: float, name: str) -> None:
        self.url = url
        self.name = name  # the upstream label: the engine's name, never its credentials
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_age = max_age
        self.families: dict[str, Family] = {}
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
            self.families = relabel(text, self.name)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
            log.debug("engine metrics from %s unavailable: %r", self.name, exc)
            self.families = {}  # absent, not stale: gateway_upstream_up tells why
        self.fetched_at = time.monotonic()


class EngineCollector:
    """Merges the families of every engine so each family is written once, HELP and TYPE first.

    The text is rendered once per fetch, not once per scrape: a vLLM engine exports hundreds of
    samples and several scrapers may ask every second.
    """

    def __init__(self, sources: Iterable[EngineSource]) -> None:
        self.sources = list(sources)
        self._text = b""
        self._rendered_from: tuple[float, ...] | None = None

    def follow(self, added: Iterable[EngineSource], removed: Iterable[str]) -> None:
        """The engines changed: scrape the added sources too; the removed URLs' series leave at once."""
        gone = set(removed)
        self.sources = [*(s for s in self.sources if s.url not in gone), *added]
        self._rendered_from = None

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(s.refresh(session) for s in self.sources))

    def exposition(self) -> bytes:
        """The merged families in the classic text format, as of the last fetches."""
        fetched = tuple(s.fetched_at for s in self.sources)
        if fetched != self._rendered_from:
            merged: dict[str, Family] = {}
            for source in self.sources:
                for name, family in source.families.items():
                    into = merged.setdefault(name, Family(header=family.header))
                    into.samples = [*into.samples, *family.samples]
            lines = [line for family in merged.values() if family.samples for line in (*family.header, *family.samples)]
            self._text = ("\n".join(lines) + "\n").encode() if lines else b""
            self._rendered_from = fetched
        return self._text
