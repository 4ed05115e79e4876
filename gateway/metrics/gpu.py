"""GPU collector: NVML readings as Prometheus series, readiness faults and a per-GPU snapshot."""

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pynvml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("gateway.gpu")

# NVML errors at init that just mean "this machine has no usable NVIDIA GPU", as opposed to a fault.
_ABSENT = (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)


def _reason_bit(suffix: str) -> int:
    """The pynvml bit of one clocks-event reason; older bindings only have the "Throttle" spelling."""
    bit = getattr(pynvml, f"nvmlClocksEventReason{suffix}", None)
    return bit if bit is not None else getattr(pynvml, f"nvmlClocksThrottleReason{suffix}")


# `reason` label value -> bit in nvmlDeviceGetCurrentClocksEventReasons' mask.
THROTTLE_REASONS: dict[str, int] = {
    label: _reason_bit(suffix)
    for label, suffix in (
        ("gpu_idle", "GpuIdle"),
        ("applications_clocks_setting", "ApplicationsClocksSetting"),
        ("sw_power_cap", "SwPowerCap"),
        ("hw_slowdown", "HwSlowdown"),
        ("sync_boost", "SyncBoost"),
        ("sw_thermal_slowdown", "SwThermalSlowdown"),
        ("hw_thermal_slowdown", "HwThermalSlowdown"),
        ("hw_power_brake_slowdown", "HwPowerBrakeSlowdown"),
        ("display_clock_setting", "DisplayClockSetting"),
    )
}


def _text(value: bytes | str) -> str:
    """NVML strings are bytes in some binding versions and str in others."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _clocks_event_reasons(nvml: ModuleType, handle: Any) -> int:
    """The clocks-event bit mask, through the pre-535 "throttle reasons" call where the new one is missing."""
    current = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if current is not None:
        try:
            return int(current(handle))
        except pynvml.NVMLError_FunctionNotFound:
            pass  # new bindings, old driver
    return int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))


def _ecc(error_type: int) -> Callable[[ModuleType, Any], int]:
    """A query for the volatile (since driver load) ECC error count of one type."""
    return lambda nvml, h: int(nvml.nvmlDeviceGetTotalEccErrors(h, error_type, pynvml.NVML_VOLATILE_ECC))


# Field name -> NVML query (module, device handle) -> value; each runs under its own guard.
_QUERIES: dict[str, Callable[[ModuleType, Any], Any]] = {
    "name": lambda nvml, h: _text(nvml.nvmlDeviceGetName(h)),
    "uuid": lambda nvml, h: _text(nvml.nvmlDeviceGetUUID(h)),
    "memory": lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h),
    "utilization_ratio": lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100,
    "temperature_celsius": lambda nvml, h: float(nvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
    "power_watts": lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
    "power_limit_watts": lambda nvml, h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
    "clocks_event_reasons": _clocks_event_reasons,
    "ecc_corrected": _ecc(pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
    "ecc_uncorrected": _ecc(pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
}
# The cheap subset faults() needs: one liveness probe and the uncorrectable ECC count.
_FAULT_FIELDS = ("memory", "ecc_uncorrected")
_SNAPSHOT_FIELDS = ("name", "uuid", "memory", "utilization_ratio", "temperature_celsius", "power_watts")


@dataclass
class _Device:
    """One GPU's readings from one poll: only the fields NVML answered, and whether the GPU is lost."""

    index: int
    lost: bool = False
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.index)


class GpuCollector(Collector):
    """Prometheus collector over NVML; on a machine without an NVIDIA GPU it only reports that.

    NVML calls are synchronous driver calls (well under a millisecond each on a healthy board).
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml: ModuleType = pynvml if nvml is None else nvml
        self._logged: set[tuple[int | None, str]] = set()
        self.available = False
        try:
            self._nvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as exc:
            level = logging.INFO if isinstance(exc, _ABSENT) else logging.WARNING
            log.log(level, "no NVIDIA GPU found: %s (%s)", exc, type(exc).__name__)
            return
        self.available = True

    def close(self) -> None:
        """Shut NVML down if this collector initialised it; safe to call more than once."""
        if not self.available:
            return
        self.available = False
        try:
            self._nvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def _once(self, gpu: int | None, what: str, exc: BaseException) -> None:
        """Log a failed NVML query at debug level the first time only, so scrapes don't spam the log."""
        if (gpu, what) not in self._logged:
            self._logged.add((gpu, what))
            log.debug("gpu %s: %s unavailable: %s (%s)", gpu, what, exc, type(exc).__name__)

    def _poll(self, fields: Iterable[str]) -> list[_Device]:
        """Query the given fields on every GPU; a field that fails is left out, GpuIsLost marks the GPU."""
        if not self.available:
            return []
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            self._once(None, "device count", exc)
            return []
        devices = []
        for index in range(count):
            device = _Device(index)
            devices.append(device)
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError_GpuIsLost:
                device.lost = True
                continue
            except pynvml.NVMLError as exc:
                self._once(index, "handle", exc)
                continue
            for name in fields:
                try:
                    device.values[name] = _QUERIES[name](nvml, handle)
                except pynvml.NVMLError_GpuIsLost:
                    device.lost = True
                    break
                except pynvml.NVMLError as exc:
                    self._once(index, name, exc)
        return devices

    def describe(self) -> Iterator[Metric]:
        """The families collect() yields, without samples (and without touching NVML)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Poll every GPU and yield the gateway_gpu_* families."""
        devices = self._poll(_QUERIES)
        families = self._families()
        available, info, mem_used, mem_total, util, temp, power, power_limit, throttle, ecc, lost = families
        available.add_metric([], 1.0 if self.available else 0.0)
        for d in devices:
            gpu, v = d.label, d.values
            lost.add_metric([gpu], 1.0 if d.lost else 0.0)
            if "name" in v or "uuid" in v:
                info.add_metric([gpu, v.get("name", ""), v.get("uuid", "")], 1.0)
            if "memory" in v:
                mem_used.add_metric([gpu], float(v["memory"].used))
                mem_total.add_metric([gpu], float(v["memory"].total))
            for family, key in (
                (util, "utilization_ratio"),
                (temp, "temperature_celsius"),
                (power, "power_watts"),
                (power_limit, "power_limit_watts"),
            ):
                if key in v:
                    family.add_metric([gpu], v[key])
            if "clocks_event_reasons" in v:
                mask = v["clocks_event_reasons"]
                for reason, bit in THROTTLE_REASONS.items():
                    throttle.add_metric([gpu, reason], 1.0 if mask & bit else 0.0)
            for kind in ("corrected", "uncorrected"):
                if f"ecc_{kind}" in v:
                    ecc.add_metric([gpu, kind], float(v[f"ecc_{kind}"]))
        yield available
        if self.available:
            yield from families[1:]

    @staticmethod
    def _families() -> tuple[Metric, ...]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("gpu",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"gateway_gpu_{name}", doc, labels=list(labels))

        return (
            gauge("available", "1 if NVML is usable on this machine, 0 if no NVIDIA GPU was found.", ()),
            gauge("info", "Constant 1 per GPU, labelled with its name and UUID.", ("gpu", "name", "uuid")),
            gauge("memory_used_bytes", "GPU memory in use."),
            gauge("memory_total_bytes", "GPU memory installed."),
            gauge("utilization_ratio", "Fraction of the last sample period a kernel was running (0..1)."),
            gauge("temperature_celsius", "GPU die temperature."),
            gauge("power_watts", "Board power draw."),
            gauge("power_limit_watts", "Enforced board power limit."),
            gauge(
                "throttle_active",
                "1 while this clocks-event (throttle) reason holds clocks down.",
                ("gpu", "reason"),
            ),
            CounterMetricFamily(
                "gateway_gpu_ecc_errors",
                "Volatile (since driver load) ECC memory errors, by type corrected|uncorrected.",
                labels=["gpu", "type"],
            ),
            gauge("lost", "1 if NVML reports the GPU as lost (fallen off the bus); needs a reset."),
        )

    def faults(self) -> list[str]:
        """Reasons the gateway should not report ready: lost GPUs and uncorrectable ECC errors.

        Polls only a liveness probe and the uncorrectable ECC count, so a health loop can call it often.
        Empty when NVML is not available: a machine without a GPU is not a fault of the gateway.
        """
        reasons = []
        for d in self._poll(_FAULT_FIELDS):
            if d.lost:
                reasons.append(f"gpu {d.index}: lost")
            elif (errors := d.values.get("ecc_uncorrected", 0)) > 0:
                reasons.append(f"gpu {d.index}: {errors} uncorrectable ECC errors")
        return reasons

    def snapshot(self) -> list[dict[str, Any]]:
        """Per GPU: index, lost, name, uuid, memory_used_bytes, memory_total_bytes, utilization_ratio,
        temperature_celsius, power_watts (None where NVML did not answer); empty without NVML."""
        result = []
        for d in self._poll(_SNAPSHOT_FIELDS):
            v = d.values
            memory = v.get("memory")
            result.append(
                {
                    "index": d.index,
                    "lost": d.lost,
                    "name": v.get("name"),
                    "uuid": v.get("uuid"),
                    "memory_used_bytes": None if memory is None else int(memory.used),
                    "memory_total_bytes": None if memory is None else int(memory.total),
                    "utilization_ratio": v.get("utilization_ratio"),
                    "temperature_celsius": v.get("temperature_celsius"),
                    "power_watts": v.get("power_watts"),
                }
            )
        return result
