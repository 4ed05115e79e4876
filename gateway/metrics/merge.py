"""Exact /metrics across worker processes: each worker's series as plain data, merged with counters and
histograms summed and gauges summed or the largest, and the series the parent answers for all of them."""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

# the series that the parent answers for all workers together: its admission's, its checks', its breakers' and its
# DNS discovery's
_PARENTS = frozenset(
    ("gateway_requests_in_flight", "gateway_queue_depth", "gateway_tokens_in_flight",
     "gateway_key_requests_in_flight", "gateway_key_queue_depth", "gateway_upstream_up",
     "gateway_upstream_breaker_state", "gateway_dns_resolutions", "gateway_upstream_changes")
)  # fmt: skip
_HOST = ("gateway_gpu_", "gateway_host_")  # the GPU and host series: the parent collects them, once
_SUMMED_GAUGES = frozenset(("gateway_client_connections", "gateway_upstream_requests_in_flight"))
_ADDITIVE = frozenset(("counter", "histogram", "summary"))

# One family: (name, type, documentation, [(sample name, labels, value)])
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]


def families(collected: Iterable[Metric], worker: str) -> list[Family]:
    """A registry's families as plain data for the wire; the process's own (``process_*``, ``python_*``) get a
    ``worker`` label, so that each process's series stay apart in the merge."""
    return [
        (m.name, m.type, m.documentation,
         [(s.name, s.labels if gateway_series(m.name) else {**s.labels, "worker": worker}, s.value) for s in m.samples])
        for m in collected
    ]  # fmt: skip


def gateway_series(name: str) -> bool:
    """The gateway's own series (every process's others, process_* and python_*, are kept apart)."""
    return name.startswith("gateway_")


def parents_series(name: str) -> bool:
    """The series the parent answers for all workers together (a worker's copies are left out)."""
    return name in _PARENTS or name.startswith(_HOST)


def _key(sample: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """One sample's identity across workers: its name and its labels in order."""
    return sample, tuple(sorted(labels.items()))


class Merged:
    """The gateway_* series of every worker: counters and histograms summed, gauges summed or the largest."""

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}
        self.values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(self, fams: Iterable[Family], *, gauges: bool = True) -> None:
        for name, kind, doc, samples in fams:
            if parents_series(name) or (not gauges and kind not in _ADDITIVE):
                continue
            self.meta.setdefault(name, (kind, doc))
            values = self.values.setdefault(name, {})
            summed = kind in _ADDITIVE or name in _SUMMED_GAUGES
            for sample, labels, value in samples:
                key = _key(sample, labels)
                old = values.get(key)
                if old is None:
                    values[key] = value
                elif summed:
                    values[key] = old + value
                elif not math.isnan(value) and (math.isnan(old) or value > old):
                    values[key] = value

    def put(self, fams: Iterable[Family]) -> None:
        """Families taken as they are (the parent's own), in place of any the workers sent."""
        for name, kind, doc, samples in fams:
            self.meta[name] = (kind, doc)
            self.values[name] = {_key(sample, labels): value for sample, labels, value in samples}

    def families(self) -> list[Family]:
        return [
            (name, kind, doc, [(s, dict(labels), v) for (s, labels), v in self.values[name].items()])
            for name, (kind, doc) in self.meta.items()
        ]

    def collect(self) -> Iterable[Metric]:
        for name, (kind, doc) in self.meta.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in self.values[name].items():
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        return generate_latest(registry)
