"""Tests for HostCollector with the real psutil."""

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics.host import HostCollector


def test_values_are_plausible() -> None:
    registry = CollectorRegistry()
    registry.register(HostCollector())
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert set(values) == {
        "gateway_host_cpu_usage_ratio",
        "gateway_host_cpus",
        "gateway_host_memory_total_bytes",
        "gateway_host_memory_available_bytes",
        "gateway_host_memory_used_bytes",
    }
    assert 0 <= values["gateway_host_cpu_usage_ratio"] <= 1
    assert values["gateway_host_cpus"] >= 1
    assert values["gateway_host_memory_total_bytes"] > values["gateway_host_memory_available_bytes"] > 0
    assert values["gateway_host_memory_total_bytes"] > values["gateway_host_memory_used_bytes"] > 0


def test_no_process_duplicates() -> None:
    """Registering next to ProcessCollector works: the host collector exports no process_* series."""
    registry = CollectorRegistry()
    registry.register(ProcessCollector(registry=None))
    registry.register(HostCollector())
    names = [f.name for f in text_string_to_metric_families(generate_latest(registry).decode())]
    assert len(names) == len(set(names))
    host = [f.name for f in HostCollector().collect()]
    assert host and all(n.startswith("gateway_host_") for n in host)
    assert not any("resident" in n or "fds" in n or "rss" in n for n in host)


def test_snapshot() -> None:
    snap = HostCollector().snapshot()
    assert set(snap) == {
        "cpu_percent",
        "cpu_count",
        "memory_total_bytes",
        "memory_available_bytes",
        "memory_used_bytes",
        "memory_percent",
    }
    assert 0 <= snap["cpu_percent"] <= 100
    assert 0 <= snap["memory_percent"] <= 100
    assert snap["memory_total_bytes"] > snap["memory_available_bytes"] > 0
