"""Host collector: machine-wide CPU and memory from psutil (process series come from ProcessCollector)."""

from collections.abc import Iterator
from typing import Any

import psutil
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class HostCollector(Collector):
    """Prometheus collector for whole-host CPU and memory; every reading is non-blocking."""

    def __init__(self) -> None:
        # cpu_percent(interval=None) measures since the previous call; prime it so the first scrape is real.
        psutil.cpu_percent(interval=None)

    def describe(self) -> Iterator[Metric]:
        """The families collect() yields, without samples."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Read psutil now and yield the gateway_host_* families."""
        cpu, count, total, available, used = self._families()
        memory = psutil.virtual_memory()
        cpu.add_metric([], psutil.cpu_percent(interval=None) / 100)
        count.add_metric([], float(psutil.cpu_count() or 0))
        total.add_metric([], float(memory.total))
        available.add_metric([], float(memory.available))
        used.add_metric([], float(memory.used))
        yield from (cpu, count, total, available, used)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "gateway_host_cpu_usage_ratio",
                "Host-wide CPU busy fraction since the previous reading (0..1).",
            ),
            GaugeMetricFamily("gateway_host_cpus", "Logical CPUs on the host."),
            GaugeMetricFamily("gateway_host_memory_total_bytes", "Physical memory installed."),
            GaugeMetricFamily(
                "gateway_host_memory_available_bytes", "Memory available to new processes without swapping."
            ),
            GaugeMetricFamily("gateway_host_memory_used_bytes", "Memory in use (psutil's definition)."),
        )

    def snapshot(self) -> dict[str, Any]:
        """Host readings for the /health JSON.

        Keys: cpu_percent (0..100, since the previous CPU reading), cpu_count, memory_total_bytes,
        memory_available_bytes, memory_used_bytes, memory_percent (0..100, used share of total).
        """
        memory = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "cpu_count": psutil.cpu_count(),
            "memory_total_bytes": memory.total,
            "memory_available_bytes": memory.available,
            "memory_used_bytes": memory.used,
            "memory_percent": memory.percent,
        }
