"""Prometheus config, recording rules, alerts and their promtool unit tests, and the dashboard's PromQL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql import VLLM_ADDED_IN_033, VLLM_REMOVED_IN_033, dashboard_queries, metric_names_in_promql

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
README = REPO / "README.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; .ci/run installs it)"
)

_HIST = ("_bucket", "_sum", "_count")


def _histogram(name: str) -> set[str]:
    return {name + suffix for suffix in _HIST}


# The gateway's /metrics contract: every series name it exposes that rules or dashboards may use.
# Counters carry their _total suffix, histograms their _bucket/_sum/_count series.
KNOWN_METRICS: frozenset[str] = frozenset(
    {
        # gateway counters
        "gateway_requests_total",
        "gateway_request_errors_total",
        # gateway histograms
        *_histogram("gateway_request_duration_seconds"),
        *_histogram("gateway_queue_wait_seconds"),
        *_histogram("gateway_time_to_first_token_seconds"),
        *_histogram("gateway_inter_token_latency_seconds"),
        *_histogram("gateway_upstream_first_byte_seconds"),
        *_histogram("gateway_relay_seconds"),
        *_histogram("gateway_prompt_tokens"),
        *_histogram("gateway_completion_tokens"),
        *_histogram("gateway_prefill_tokens_per_second"),
        # routing across engines
        "gateway_routing_decisions_total",
        "gateway_retries_total",
        "gateway_upstream_breaker_state",
        "gateway_upstream_kv_free_tokens",
        # DNS discovery of the engines
        "gateway_dns_resolutions_total",
        "gateway_upstream_changes_total",
        # long requests
        "gateway_oldest_request_age_seconds",
        "gateway_upstream_read_timeout_seconds",
        "gateway_aborted_tokens_total",
        "gateway_client_disconnects_total",
        # gateway gauges
        "gateway_requests_in_flight",
        "gateway_queue_depth",
        "gateway_queue_limit",
        "gateway_concurrency_limit",
        "gateway_tokens_in_flight",
        "gateway_tokens_in_flight_limit",
        "gateway_upstream_up",
        "gateway_upstream_requests_in_flight",
        "gateway_draining",
        "gateway_build_info",
        # access: API keys and their limits
        "gateway_key_tokens_total",
        "gateway_key_requests_in_flight",
        "gateway_key_queue_depth",
        "gateway_rate_limited_total",
        "gateway_keys",
        "gateway_keys_reload_failed",
        "gateway_limits_redis_up",
        # GPU (NVML)
        "gateway_gpu_available",
        "gateway_gpu_info",
        "gateway_gpu_memory_used_bytes",
        "gateway_gpu_memory_total_bytes",
        "gateway_gpu_utilization_ratio",
        "gateway_gpu_temperature_celsius",
        "gateway_gpu_power_watts",
        "gateway_gpu_power_limit_watts",
        "gateway_gpu_throttle_active",
        "gateway_gpu_ecc_errors_total",
        "gateway_gpu_lost",
        # host
        "gateway_host_cpu_usage_ratio",
        "gateway_host_cpus",
        "gateway_host_memory_total_bytes",
        "gateway_host_memory_available_bytes",
        "gateway_host_memory_used_bytes",
        # prometheus_client's process collector (Linux)
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        # engine series, re-exported with an `upstream` label: both generations (0.11 and 0.33)...
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:request_success_total",
        *_histogram("vllm:time_to_first_token_seconds"),
        *_histogram("vllm:inter_token_latency_seconds"),
        *_histogram("vllm:e2e_request_latency_seconds"),
        *_histogram("vllm:request_queue_time_seconds"),
        *_histogram("vllm:request_prefill_time_seconds"),
        *_histogram("vllm:request_decode_time_seconds"),
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:cache_config_info",
        # ... and what 0.33 added
        *VLLM_ADDED_IN_033,
    }
)

# Series Prometheus makes itself for every target (not on the gateway's /metrics).
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"})

REQUIRED_ALERTS = frozenset(
    {
        "GatewayDown",
        "NoReadyUpstream",
        "EngineDown",
        "HighUpstreamErrorRatio",
        "QueueSaturated",
        "TTFTp95OverSLO",
        "ITLp95OverSLO",
        "KVCacheNearFull",
        "GPUMemoryNearFull",
        "GPUTooHot",
        "GPUThrottling",
        "GPUErrors",
        "HostMemoryPressure",
        "EnginePreemptionsRising",
        "EngineQueueFull",
        "EngineRequestsErrored",
        "DNSDiscoveryFailing",
        "EngineMembershipFlapping",
    }
)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in _load(path)["groups"] for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for rule in _rules() if "alert" in rule]


def _recorded_names() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, check=False)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_assets_exist() -> None:
    assert (PROM / "prometheus.yml").is_file()
    assert {p.name for p in RULE_FILES} >= {"recording.yml", "alerts.yml"}
    assert TEST_FILES, "no promtool unit tests in prometheus/tests/"
    assert DASHBOARDS, "no dashboard in grafana/dashboards/"


@needs_promtool
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", *(str(p.relative_to(REPO)) for p in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", *(str(p.relative_to(REPO)) for p in TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": expr}
        for path in DASHBOARDS
        for i, expr in enumerate(dashboard_queries(path))
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    content = yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    rule_file.write_text(content, encoding="utf-8")
    result = _promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_scrapes_gateway_and_loads_rules() -> None:
    config = _load(PROM / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"glm-gateway", "node", "prometheus"} <= set(jobs)
    targets = [t for sc in jobs["glm-gateway"]["static_configs"] for t in sc["targets"]]
    assert targets == ["gateway:8080"]
    assert config["rule_files"] == ["rules/*.yml"]


def test_required_alerts_present() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)


def test_every_alert_is_documented() -> None:
    headings = {
        _anchor(line.lstrip("#")) for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("#")
    }
    for rule in _alerts():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name}: no {key}"
        anchor = annotations["runbook_url"].rpartition("#")[2]
        assert anchor in headings, f"{name}: runbook anchor #{anchor} is not a heading of {README.name}"


def test_every_alert_has_unit_tests_on_both_sides() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for group in _load(path)["tests"]:
            for case in group.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names <= fired, f"alerts never shown firing: {sorted(names - fired)}"
    assert names <= silent, f"alerts never shown silent: {sorted(names - silent)}"


def test_recording_rule_names_follow_convention() -> None:
    for name in _recorded_names():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_rule_metrics_are_known() -> None:
    known = KNOWN_METRICS | PROMETHEUS_SERIES | _recorded_names()
    for rule in _rules():
        unknown = metric_names_in_promql(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown metrics {sorted(unknown)}"


def test_dashboard_metrics_are_known() -> None:
    known = KNOWN_METRICS | PROMETHEUS_SERIES | _recorded_names()
    for path in DASHBOARDS:
        queries = dashboard_queries(path)
        assert queries, path
        for expr in queries:
            unknown = metric_names_in_promql(expr) - known
            assert not unknown, f"{path.name}: {expr!r} uses unknown metrics {sorted(unknown)}"


def _queries() -> list[tuple[str, str]]:
    """(where, expression) of every rule and every dashboard query."""
    rules = [(rule.get("record") or rule["alert"], rule["expr"]) for rule in _rules()]
    return rules + [(path.name, expr) for path in DASHBOARDS for expr in dashboard_queries(path)]


def test_nothing_depends_on_a_series_vllm_033_removed() -> None:
    assert not KNOWN_METRICS & VLLM_REMOVED_IN_033
    for where, expr in _queries():
        removed = metric_names_in_promql(expr) & VLLM_REMOVED_IN_033
        assert not removed, f"{where}: {expr!r} reads {sorted(removed)}, gone in vLLM 0.33"


def test_the_operators_questions_033_answers_are_asked() -> None:
    """KV capacity, why requests wait, cached prompt tokens, the engine's own refusals, finished reasons."""
    used = set().union(*(metric_names_in_promql(expr) for _, expr in _queries()))
    for name in (
        "vllm:cache_config_info",
        "vllm:num_requests_waiting_by_reason",
        "vllm:prompt_tokens_cached_total",
        "vllm:admission_rejections_total",
        "vllm:engine_sleep_state",
    ):
        assert name in used, name
    assert any('finished_reason="error"' in expr for _, expr in _queries()), "no alert on engine errors"


def test_queries_on_033_series_fall_back_for_011_engines() -> None:
    """A query that reads a series 0.33 added and one that 0.11 has too combines them with `or`, so a mixed
    fleet shows every engine; queries reading only 0.33 series are the 0.33-only panels and rules."""
    for where, expr in _queries():
        names = {n for n in metric_names_in_promql(expr) if n.startswith("vllm:")}
        if names & VLLM_ADDED_IN_033 and names - VLLM_ADDED_IN_033:
            assert re.search(r"\bor\b", expr), f"{where}: {expr!r} mixes generations without an `or` fallback"


def test_engine_busy_is_a_capacity_signal_not_an_engine_fault() -> None:
    alerts = {rule["alert"]: rule for rule in _alerts()}
    upstream_errors = alerts["HighUpstreamErrorRatio"]["expr"]
    assert "upstream_error" in upstream_errors and "engine_busy" not in upstream_errors
    recorded = {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}
    assert "engine_busy" in recorded["model_error_type:gateway_admission_rejections:rate5m"]


def test_dashboard_uses_recording_rules() -> None:
    used = set().union(*(metric_names_in_promql(q) for p in DASHBOARDS for q in dashboard_queries(p)))
    assert used & _recorded_names()


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="glm-gateway"} == 0', {"up"}),
        (
            "histogram_quantile(0.95, sum by (model, le) (rate(gateway_queue_wait_seconds_bucket[5m])))",
            {"gateway_queue_wait_seconds_bucket"},
        ),
        (
            'sum by (error_type) (rate(gateway_request_errors_total{error_type=~"a|b"}[5m]))'
            " / ignoring (error_type) group_left sum(rate(gateway_requests_total[5m] offset 1h)) > bool 1e3",
            {"gateway_request_errors_total", "gateway_requests_total"},
        ),
        ("max by (upstream) (vllm:kv_cache_usage_perc) > 0.95", {"vllm:kv_cache_usage_perc"}),
        ("a:b:c or on() vector(0) unless Inf", {"a:b:c"}),
    ],
)
def test_metric_names_in_promql(expr: str, expected: set[str]) -> None:
    assert metric_names_in_promql(expr) == expected
