"""Tests for GpuCollector against a fake NVML device layer and against the real pynvml on this machine."""

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics.gpu import THROTTLE_REASONS, GpuCollector
from gateway.metrics.host import HostCollector

GIB = 1024**3


@dataclass
class FakeGpu:
    """One fake board; a field set to an NVMLError class makes that query raise it."""

    name: bytes | str = b"NVIDIA H100 80GB HBM3"
    uuid: bytes | str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_used: int = 20 * GIB
    memory_total: int = 80 * GIB
    utilization_percent: int = 75
    temperature: int = 61
    power_mw: int = 350_500
    power_limit_mw: int = 700_000
    reasons: int = 0
    ecc: dict[int, int] = field(default_factory=dict)
    fail: dict[str, type[pynvml.NVMLError]] = field(default_factory=dict)
    lost: bool = False


class FakeNvml:
    """Implements the pynvml calls GpuCollector makes, raising the real pynvml error classes."""

    def __init__(self, gpus: list[FakeGpu], init_error: type[pynvml.NVMLError] | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def _gpu(self, handle: FakeGpu, query: str) -> FakeGpu:
        if handle.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if query in handle.fail:
            raise handle.fail[query]()
        return handle

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error()

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes | str:
        return self._gpu(h, "name").name

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> bytes | str:
        return self._gpu(h, "uuid").uuid

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:
        g = self._gpu(h, "memory")
        return SimpleNamespace(used=g.memory_used, total=g.memory_total, free=g.memory_total - g.memory_used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._gpu(h, "utilization").utilization_percent, memory=10)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(h, "temperature").temperature

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return self._gpu(h, "power").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        return self._gpu(h, "power_limit").power_limit_mw

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeGpu) -> int:
        return self._gpu(h, "reasons").reasons

    def nvmlDeviceGetTotalEccErrors(self, h: FakeGpu, error_type: int, counter_type: int) -> int:
        assert counter_type == pynvml.NVML_VOLATILE_ECC
        return self._gpu(h, "ecc").ecc.get(error_type, 0)


class OldFakeNvml(FakeNvml):
    """Bindings from before 535: only the "throttle reasons" spelling exists."""

    nvmlDeviceGetCurrentClocksEventReasons = None  # type: ignore[assignment]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeGpu) -> int:
        return self._gpu(h, "reasons").reasons


def scrape(*collectors: Any) -> str:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parsed exposition: (sample name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str) -> float:
    return parsed[(metric, tuple(sorted(labels.items())))]


def names_for_gpu(parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], gpu: str) -> set[str]:
    return {name for name, labels in parsed if ("gpu", gpu) in labels}


def test_values_and_units() -> None:
    ecc = {pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 4}
    reasons = pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown
    gpus = [FakeGpu(reasons=reasons, ecc=ecc), FakeGpu(name="NVIDIA L4", uuid=b"GPU-1", temperature=40)]
    parsed = samples(scrape(GpuCollector(FakeNvml(gpus))))

    assert value(parsed, "gateway_gpu_available") == 1
    info = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-00000000-0000-0000-0000-000000000000"}
    assert value(parsed, "gateway_gpu_info", **info) == 1
    assert value(parsed, "gateway_gpu_info", gpu="1", name="NVIDIA L4", uuid="GPU-1") == 1
    assert value(parsed, "gateway_gpu_memory_used_bytes", gpu="0") == 20 * GIB
    assert value(parsed, "gateway_gpu_memory_total_bytes", gpu="0") == 80 * GIB
    assert value(parsed, "gateway_gpu_utilization_ratio", gpu="0") == pytest.approx(0.75)
    assert value(parsed, "gateway_gpu_temperature_celsius", gpu="0") == 61
    assert value(parsed, "gateway_gpu_temperature_celsius", gpu="1") == 40
    assert value(parsed, "gateway_gpu_power_watts", gpu="0") == pytest.approx(350.5)
    assert value(parsed, "gateway_gpu_power_limit_watts", gpu="0") == pytest.approx(700.0)
    assert value(parsed, "gateway_gpu_ecc_errors_total", gpu="0", type="corrected") == 4
    assert value(parsed, "gateway_gpu_ecc_errors_total", gpu="0", type="uncorrected") == 0
    assert value(parsed, "gateway_gpu_lost", gpu="0") == 0
    active = {
        reason
        for reason in THROTTLE_REASONS
        if value(parsed, "gateway_gpu_throttle_active", gpu="0", reason=reason) == 1
    }
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    assert all(value(parsed, "gateway_gpu_throttle_active", gpu="1", reason=r) == 0 for r in THROTTLE_REASONS)


def test_throttle_reasons_fall_back_to_old_bindings() -> None:
    nvml = OldFakeNvml([FakeGpu(reasons=pynvml.nvmlClocksThrottleReasonGpuIdle)])
    parsed = samples(scrape(GpuCollector(nvml)))
    assert value(parsed, "gateway_gpu_throttle_active", gpu="0", reason="gpu_idle") == 1
    assert value(parsed, "gateway_gpu_throttle_active", gpu="0", reason="hw_slowdown") == 0


def test_not_supported_omits_only_that_series(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.gpu")
    consumer = FakeGpu(fail={"ecc": pynvml.NVMLError_NotSupported, "power": pynvml.NVMLError_NotSupported})
    collector = GpuCollector(FakeNvml([FakeGpu(), consumer]))
    for _ in range(3):
        parsed = samples(scrape(collector))

    full = names_for_gpu(parsed, "0")
    assert names_for_gpu(parsed, "1") == full - {"gateway_gpu_ecc_errors_total", "gateway_gpu_power_watts"}
    assert value(parsed, "gateway_gpu_power_limit_watts", gpu="1") == pytest.approx(700.0)
    assert collector.faults() == []
    # Logged once per (gpu, field), at debug, however many scrapes.
    assert len(caplog.records) == 3  # ecc_corrected, ecc_uncorrected, power_watts
    assert {r.levelno for r in caplog.records} == {logging.DEBUG}


def test_gpu_is_lost_is_a_fault() -> None:
    lost = FakeGpu(lost=True)
    collector = GpuCollector(FakeNvml([FakeGpu(), lost]))
    parsed = samples(scrape(collector))
    assert value(parsed, "gateway_gpu_lost", gpu="0") == 0
    assert value(parsed, "gateway_gpu_lost", gpu="1") == 1
    assert names_for_gpu(parsed, "1") == {"gateway_gpu_lost"}
    assert collector.faults() == ["gpu 1: lost"]
    assert [g["lost"] for g in collector.snapshot()] == [False, True]


def test_lost_in_the_middle_of_a_poll() -> None:
    """A board that answers some queries and then falls off the bus."""
    collector = GpuCollector(FakeNvml([FakeGpu(fail={"ecc": pynvml.NVMLError_GpuIsLost})]))
    parsed = samples(scrape(collector))
    assert value(parsed, "gateway_gpu_lost", gpu="0") == 1
    assert value(parsed, "gateway_gpu_temperature_celsius", gpu="0") == 61
    assert collector.faults() == ["gpu 0: lost"]


def test_uncorrectable_ecc_is_a_fault() -> None:
    ecc = {pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 3, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 9}
    gpus = [FakeGpu(ecc={pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 9}), FakeGpu(ecc=ecc)]
    collector = GpuCollector(FakeNvml(gpus))
    assert collector.faults() == ["gpu 1: 3 uncorrectable ECC errors"]
    parsed = samples(scrape(collector))
    assert value(parsed, "gateway_gpu_ecc_errors_total", gpu="1", type="uncorrected") == 3


def test_snapshot() -> None:
    collector = GpuCollector(FakeNvml([FakeGpu(fail={"temperature": pynvml.NVMLError_NotSupported})]))
    assert collector.snapshot() == [
        {
            "index": 0,
            "lost": False,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-00000000-0000-0000-0000-000000000000",
            "memory_used_bytes": 20 * GIB,
            "memory_total_bytes": 80 * GIB,
            "utilization_ratio": pytest.approx(0.75),
            "temperature_celsius": None,
            "power_watts": pytest.approx(350.5),
        }
    ]


@pytest.mark.parametrize(
    "error",
    [
        pynvml.NVMLError_LibraryNotFound,
        pynvml.NVMLError_DriverNotLoaded,
        pynvml.NVMLError_NoPermission,
        pynvml.NVMLError_Unknown,
    ],
)
def test_no_gpu_logs_once(caplog: pytest.LogCaptureFixture, error: type[pynvml.NVMLError]) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.gpu")
    nvml = FakeNvml([FakeGpu()], init_error=error)
    collector = GpuCollector(nvml)
    assert collector.available is False
    for _ in range(3):
        parsed = samples(scrape(collector))
        assert parsed == {("gateway_gpu_available", ()): 0}
    assert collector.faults() == []
    assert collector.snapshot() == []
    collector.close()
    assert nvml.shutdown_calls == 0
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("no NVIDIA GPU found: ")
    assert caplog.records[0].levelno >= logging.INFO


def test_close_is_idempotent() -> None:
    nvml = FakeNvml([FakeGpu()])
    collector = GpuCollector(nvml)
    collector.close()
    collector.close()
    assert nvml.init_calls == 1
    assert nvml.shutdown_calls == 1


def test_real_pynvml_without_driver() -> None:
    """This machine has no NVIDIA driver: the real pynvml must leave the collector unavailable, quietly."""
    collector = GpuCollector()
    if collector.available:
        collector.close()
        pytest.skip("an NVIDIA driver is present on this machine")
    parsed = samples(scrape(collector))
    assert value(parsed, "gateway_gpu_available") == 0
    assert collector.faults() == []
    assert collector.snapshot() == []
    collector.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_promtool_lint() -> None:
    gpus = [FakeGpu(ecc={pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 1}), FakeGpu(lost=True)]
    text = scrape(GpuCollector(FakeNvml(gpus)), HostCollector())
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
