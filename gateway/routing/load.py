"""The live load of each engine: its own ``/metrics`` view when fresh, else the gateway's own counts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gateway.metrics.engine import EngineSource, Family
from gateway.routing.breaker import Breaker
from gateway.upstreams import Upstream

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_USAGE, CACHE_CONFIG = "vllm:kv_cache_usage_perc", "vllm:cache_config_info"
ENGINE, GATEWAY = "engine", "gateway"  # the load source an engine's routing uses (/status)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What one engine reported in its last ``/metrics``, summed over its data-parallel ranks."""

    requests: int  # running + waiting
    waiting: int
    kv_capacity: int  # tokens (num_gpu_blocks x block_size); 0 when the engine does not say
    kv_used: int  # tokens, from vllm:kv_cache_usage_perc


def _samples(family: Family | None) -> list[tuple[dict[str, str], float]]:
    """Each sample line's labels and value (lines as ``gateway.metrics.engine.relabel`` keeps them)."""
    out = []
    for line in family.samples if family is not None else ():
        close = line.rfind("}")
        try:
            value = float(line[close + 1 :].split()[0])
        except (IndexError, ValueError):
            continue
        out.append((dict(_LABEL.findall(line, 0, close)), value))
    return out


def parse_load(families: dict[str, Family]) -> EngineLoad | None:
    """The load of one engine from its ``vllm:*`` families; None when it exports no request counts."""
    running = _samples(families.get(RUNNING))
    if not running:
        return None
    waiting = sum(v for _, v in _samples(families.get(WAITING)))
    capacity: dict[str, int] = {}
    for labels, _ in _samples(families.get(CACHE_CONFIG) or families.get(CACHE_CONFIG.removesuffix("_info"))):
        try:
            blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
        except (KeyError, ValueError):
            continue
        capacity[labels.get("engine", "")] = blocks * size
    mean = sum(capacity.values()) / len(capacity) if capacity else 0
    used = sum(v * capacity.get(labels.get("engine", ""), mean) for labels, v in _samples(families.get(KV_USAGE)))
    requests = sum(v for _, v in running) + waiting
    return EngineLoad(int(requests), int(waiting), sum(capacity.values()), int(used))


class EngineState:
    """One engine as routing sees it: its load view, the gateway's own tokens in flight to it, its breaker,
    its weight and its slow start."""

    __slots__ = (
        "breaker", "headroom", "load", "loaded_at", "others", "slow_start", "source", "stale_after", "tokens",
        "upstream", "was_up", "weight",
    )  # fmt: skip

    def __init__(
        self,
        upstream: Upstream,
        source: EngineSource | None,
        breaker: Breaker,
        *,
        weight: float,
        headroom: float,
        slow_start: float,
        stale_after: float,
    ) -> None:
        self.upstream = upstream
        self.source = source
        self.breaker = breaker
        self.weight = weight
        self.headroom = headroom
        self.slow_start = slow_start
        self.stale_after = stale_after
        self.load: EngineLoad | None = None
        self.loaded_at = -math.inf
        self.tokens = 0  # estimated tokens (prompt + max_tokens) this gateway has in flight to it
        self.others = 0  # those the other workers of --workers have in flight to it, as their parent last said
        self.was_up: bool | None = None  # None until its first good check

    def update(self, now: float) -> None:
        """Read the source's last fetch; note an engine coming back (its slow start)."""
        source = self.source
        if source is not None and source.fetched_at > self.loaded_at:
            self.load = parse_load(source.families)
            self.loaded_at = source.fetched_at
        up = self.upstream.up
        if up and self.was_up is False:
            self.breaker.recovered_at = now  # back after a down spell (not its first check at start)
        if up or self.was_up is not None:
            self.was_up = up

    def view(self, now: float) -> EngineLoad | None:
        """The engine's own view while fresh, else None (routing falls back to the gateway's counts)."""
        if self.load is None or now - self.loaded_at > self.stale_after:
            return None
        return self.load

    def requests(self, now: float) -> int:
        """Requests at the engine: its own count (other gateways send to it too), or ours when higher."""
        view = self.view(now)
        own = self.upstream.in_flight
        return own if view is None else max(own, view.requests)

    def capacity(self, now: float) -> int:
        """The KV tokens a request may use there (capacity x --kv-headroom); 0 when unknown."""
        view = self.view(now)
        return int(view.kv_capacity * self.headroom) if view is not None else 0

    def room(self, now: float) -> float:
        """KV tokens free for new requests: capacity minus the engine's usage or ours, the higher; inf when
        the engine does not report its KV cache."""
        view = self.view(now)
        if view is None or not view.kv_capacity:
            return math.inf
        return view.kv_capacity * self.headroom - max(self.tokens + self.others, view.kv_used)

    def share(self, now: float) -> float:
        """Its weight, ramped from a tenth to whole over --slow-start seconds after it came back."""
        since = self.breaker.recovered_at
        if since is None or not self.slow_start:
            return self.weight
        ramp = (now - since) / self.slow_start
        if ramp >= 1:
            self.breaker.recovered_at = None
            return self.weight
        return self.weight * max(0.1, ramp)

    def usable(self, now: float) -> bool:
        return self.upstream.up and self.breaker.available(now)

    def public(self, now: float) -> dict[str, object]:
        view = self.view(now)
        room = self.room(now)
        return {
            "load_source": ENGINE if view is not None else GATEWAY,
            "requests": self.requests(now),
            "waiting": view.waiting if view is not None else None,
            "kv_capacity_tokens": view.kv_capacity if view is not None else None,
            "kv_used_tokens": view.kv_used if view is not None else None,
            "kv_free_tokens": None if math.isinf(room) else int(room),
            "gateway_tokens_in_flight": self.tokens,
            "other_workers_tokens_in_flight": self.others,
            "weight": self.weight,
            "share": round(self.share(now), 3),
            "breaker": self.breaker.state(now),
            "breaker_failures": self.breaker.fails,
        }
