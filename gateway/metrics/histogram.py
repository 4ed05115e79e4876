"""Histograms observed from the event loop only: prometheus_client's exposition without its per-observation locks."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class HistogramChild:
    """One label set's buckets: an observation is a bisect and two additions (prometheus_client's takes a lock
    per bucket it walks past and per sum, about 1 µs, once per relayed event)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # the finite upper bounds; the last count is +Inf's
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value


class Histogram:
    """prometheus_client's ``Histogram`` as the gateway uses it (``labels(...).observe(v)``), collected into the
    same series: ``_bucket`` with cumulative counts and ``le`` as prometheus_client writes it, ``_count`` and
    ``_sum``.  Not thread-safe by design: every observation happens on the event loop, as does every scrape."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        self._le = [*map(floatToGoString, self.bounds), "+Inf"]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)  # type: ignore[arg-type]

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self.bounds)
        return child

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        le = self._le
        for values, child in list(self._children.items()):
            total = 0
            cumulative = []
            for bound, count in zip(le, child.counts, strict=True):
                total += count
                cumulative.append((bound, total))
            family.add_metric(values, cumulative, child.sum)
        return [family]
