"""A real Prometheus scraping a real gateway in front of a simulated vLLM of each generation (0.33, 0.11): the
operator's questions, every dashboard panel, every rule."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics.gpu import GpuCollector
from tests.harness import MODEL, Process, free_port, gpu_available, wait_http, wait_until
from tests.promql import VLLM_ADDED_IN_033, dashboard_queries, metric_names_in_promql

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus server not installed (Debian package 'prometheus'; CI installs it)"
)

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = REPO / "grafana" / "dashboards" / "glm-gateway.json"
HELLO = [{"role": "user", "content": "Hello there"}]
# Long enough for several 16-token KV blocks: sent twice, its leading blocks come from the prefix cache.
LONG = [{"role": "user", "content": " ".join(f"paragraph {i} of the shared system prompt." for i in range(40))}]
# The stream that holds the 0.33 engine's one queue slot while a second request is refused (never runs out first).
HOLD_TOKENS = 50_000
TOKEN_BUDGET = 100_000
# Series Prometheus makes itself, not on the gateway's /metrics.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"})
# What a 0.11 engine may lack: the series 0.33 added, and vllm:cache_config_info, which vLLM 0.11's V1 engine
# exports too but the sim imitates only in 0.33 (once it exports it in 0.11, its panel must have data there).
MAY_LACK_BEFORE_033 = VLLM_ADDED_IN_033 | {"vllm:cache_config_info"}
# GPU panels that show nothing while the GPU is healthy.
GPU_EMPTY_WHEN_HEALTHY = frozenset({"gateway_gpu_throttle_active == 1"})


@dataclass
class Stack:
    generation: str
    sim: str
    upstream: str  # the engine's label: the sim found by DNS discovery (localhost, the system resolver)
    gateway: str
    prometheus: str
    gpu: bool
    sent: int

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # a bad query answers 400 with a JSON error
            return json.load(e)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200


def _sim_state(sim: str) -> dict[str, Any]:
    with urllib.request.urlopen(sim + "/admin/state", timeout=10) as r:
        return json.load(r)


def _engine_busy(client: openai.OpenAI, sim: str) -> int:
    """A 0.33 engine started with --max-num-queued-reqs 1 refuses a second request while one runs: 503,
    passed on by the only engine's gateway as engine_busy. Returns the requests sent (the held stream is
    then closed: a client_disconnected for the error panels)."""
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=HOLD_TOKENS, stream=True)
    try:
        next(iter(stream))  # the engine has admitted it: its one slot is taken until the stream ends
        with pytest.raises(openai.InternalServerError) as busy:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert busy.value.status_code == 503
        assert busy.value.response.headers["Retry-After"]
    finally:
        stream.close()
    wait_until(lambda: _sim_state(sim)["running"] == 0, "the engine to drop the stream its client left")
    return 2


def _traffic(gateway: str, sim: str, generation: str) -> int:
    """Streamed and not, chat and completions, a repeated long prompt (prefix-cache hits), a few failures for
    the error panels and, in front of a 0.33 engine, its own 503; returns the requests sent."""
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=TENANT_KEY, max_retries=0)
    sent = 0
    try:
        for _ in range(2):
            client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=2)
            sent += 1
        for i in range(4):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3 + i)
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
            for _chunk in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, stream=True):
                pass
            for _chunk in client.completions.create(model=MODEL, prompt="hi", max_tokens=5, stream=True):
                pass
            sent += 4
        for max_tokens in (2_000_000, TOKEN_BUDGET + 1):  # context_exceeded, tokens_budget
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens)
            sent += 1
        _post(sim + "/admin/faults", {"drop_after_tokens": 1})  # upstream_error
        try:
            with pytest.raises(openai.APIError):
                for _chunk in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True):
                    pass
            sent += 1
        finally:
            _post(sim + "/admin/faults", {"drop_after_tokens": -1})
        if generation == "0.33":
            sent += _engine_busy(client, sim)
    finally:
        client.close()
    return sent


# The gateway runs with keys, as the tenants panels need: Prometheus scrapes with the admin key, the
# traffic comes from a tenant with limits (so its rate-limit series exist).
ADMIN_KEY = "live-admin-key-0123456789"
TENANT_KEY = "live-tenant-key-0123456789"
KEYS_FILE = f"""
[[key]]
name = "prometheus"
key = "{ADMIN_KEY}"
admin = true

[[key]]
name = "tenant"
key = "{TENANT_KEY}"
requests_per_minute = 100000
tokens_per_minute = 100000000
"""


def _prometheus_config(tmp: Path, gateway: str) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "glm-gateway",
                "authorization": {"credentials": ADMIN_KEY},
                "static_configs": [{"targets": [gateway.removeprefix("http://")]}],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# The sim's flags per generation: 0.33 with a one-request engine queue, so that its 503 shows up.
SIM_FLAGS = {"0.33": ("--vllm-compat", "0.33", "--max-num-queued-reqs", "1"), "0.11": ("--vllm-compat", "0.11")}


@pytest.fixture(scope="module", params=sorted(SIM_FLAGS, reverse=True), ids=lambda g: f"vllm-{g}")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    generation: str = request.param
    tmp = tmp_path_factory.mktemp("prometheus")
    sim_port, gw_port, prom_port = free_port(), free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    gateway = f"http://127.0.0.1:{gw_port}"
    prom = f"http://127.0.0.1:{prom_port}"
    procs: list[Process] = []
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        sim_flags = ("--host", "127.0.0.1", "--port", str(sim_port), "--itl", "0.002", *SIM_FLAGS[generation])
        procs.append(Process("sim", *sim_flags))
        wait_http(sim + "/health")
        flags = {
            "--host": "127.0.0.1",
            "--port": str(gw_port),
            "--upstream": f"http://localhost:{sim_port}",
            "--dns-interval": "1",
            "--max-tokens-in-flight": str(TOKEN_BUDGET),
            "--health-interval": "0.5",
            "--log-level": "error",
            "--keys-file": str(tmp / "keys.toml"),
        }
        (tmp / "keys.toml").write_text(KEYS_FILE, encoding="utf-8")
        procs.append(Process("serve", *(x for pair in flags.items() for x in pair)))
        wait_http(gateway + "/health/ready")
        assert PROMETHEUS is not None
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={_prometheus_config(tmp, gateway)}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(prom + "/-/ready")
        st = Stack(generation, sim, f"localhost@127.0.0.1:{sim_port}", gateway, prom, gpu_available(), 0)
        # one scrape before the traffic, so rate() sees the counters move
        wait_until(lambda: st.scalar('up{job="glm-gateway"}') == 1, "Prometheus to scrape the gateway")
        st.sent = _traffic(gateway, sim, generation)
        wait_until(lambda: st.scalar("sum(gateway_requests_total)") == st.sent, "Prometheus to see every request")
        yield st
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(10)
        for proc in reversed(procs):
            proc.stop()


def _finite_positive(stack: Stack, expr: str) -> float:
    """Poll until expr gives a finite positive number (a rule or a rate needs a scrape or two)."""

    def check() -> float | None:
        v = stack.scalar(expr)
        return v if v is not None and math.isfinite(v) and v > 0 else None

    return wait_until(check, f"{expr} to be a finite positive number", timeout=30)


def test_answers_the_operators_questions(stack: Stack) -> None:
    assert _finite_positive(stack, "sum(rate(gateway_requests_total[1m]))")
    for histogram in ("gateway_request_duration_seconds", "gateway_time_to_first_token_seconds"):
        for q in (0.5, 0.95, 0.99):
            _finite_positive(stack, f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[1m])))")
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        result = stack.query(name)
        assert [r["metric"]["upstream"] for r in result] == [stack.upstream], name
        assert result[0]["metric"]["model_name"] == MODEL
        assert 0 <= float(result[0]["value"][1]) <= 1 or name == "vllm:num_requests_waiting"
    assert _finite_positive(stack, "gateway_host_memory_available_bytes")
    # the engine is DNS discovery's: its name resolved, and no resolution failed
    assert _finite_positive(stack, 'sum(gateway_dns_resolutions_total{result="ok"})')
    assert stack.scalar('sum(gateway_dns_resolutions_total{result!="ok"})') == 0
    # the repeated long prompt was partly served from the prefix cache, in either generation
    assert _finite_positive(stack, "upstream:vllm_prompt_tokens_cached:ratio_rate5m") < 1
    if stack.generation == "0.33":
        (info,) = stack.query("vllm:cache_config_info")
        assert int(info["metric"]["num_gpu_blocks"]) * int(info["metric"]["block_size"]) > 0
        assert _finite_positive(stack, 'sum(gateway_request_errors_total{error_type="engine_busy"})') == 1
        assert _finite_positive(stack, "sum(vllm:admission_rejections_total)") == 1
    if stack.gpu:
        assert _finite_positive(stack, "sum(gateway_gpu_memory_total_bytes)")
        assert stack.scalar("gateway_gpu_available") == 1
    else:
        assert stack.scalar("gateway_gpu_available") == 0
        assert stack.query("gateway_gpu_memory_used_bytes") == []


def _gpu_only(expr: str) -> bool:
    """Series that exist only where NVML found a GPU (gateway_gpu_available itself is always there)."""
    names = metric_names_in_promql(expr)
    return any((n.startswith("gateway_gpu_") and n != "gateway_gpu_available") or n.startswith("gpu:") for n in names)


def _exposed(stack: Stack) -> set[str]:
    scrape = urllib.request.Request(stack.gateway + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(scrape, timeout=10) as r:
        return _exposed_names(r.read().decode())


def _empty_before_033(stack: Stack, expr: str, exposed: set[str]) -> bool:
    """In front of a 0.11 engine: a query that reads only series it does not export (0.33 added them), or
    the engine's own 503 (engine_busy), which a 0.11 engine never sends. Empty there by design."""
    if stack.generation == "0.33":
        return False
    if 'error_type="engine_busy"' in expr:
        return True
    engine = {n for n in metric_names_in_promql(expr) if n.startswith("vllm:")}
    return bool(engine) and engine <= MAY_LACK_BEFORE_033 - exposed


def test_every_dashboard_query_runs_and_has_data(stack: Stack) -> None:
    subs = {
        "model": MODEL,
        "upstream": stack.upstream,
        "__rate_interval": "1m",
        "__interval": "15s",
        "__range": "1h",
    }
    queries = dashboard_queries(DASHBOARD, subs)
    assert queries
    for expr in queries:
        stack.query(expr)  # every query parses and runs
    # The exemptions: without a GPU, every GPU panel; with one, the panels that are empty on a healthy
    # GPU (throttling filtered to == 1) or where NVML does not answer (no ECC on many boards); in front of
    # a 0.11 engine, the panels of what 0.33 added.
    exposed = _exposed(stack)
    if stack.gpu:
        exempt = {
            q
            for q in queries
            if _gpu_only(q) and (q in GPU_EMPTY_WHEN_HEALTHY or not metric_names_in_promql(q) <= exposed)
        }
    else:
        exempt = {q for q in queries if _gpu_only(q)}
        assert exempt, "the dashboard has no GPU panels?"
    before_033 = {q for q in queries if _empty_before_033(stack, q, exposed)}
    assert bool(before_033) == (stack.generation == "0.11")
    expected = [q for q in queries if q not in exempt | before_033]

    def empty() -> list[str]:
        return [q for q in expected if not stack.query(q)]

    try:
        wait_until(lambda: not empty(), "every dashboard panel to have data", timeout=30)
    except AssertionError:
        raise AssertionError(f"panels without data: {empty()}") from None


def _rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    ]


def test_every_rule_expression_runs_and_evaluates_ok(stack: Stack) -> None:
    rules = _rules()
    assert rules
    for rule in rules:
        stack.query(rule["expr"])

    def loaded() -> list[dict[str, Any]] | None:
        groups = stack.api("rules")["data"]["groups"]
        found = [r for g in groups for r in g["rules"]]
        return found if len(found) == len(rules) and all(r["health"] != "unknown" for r in found) else None

    evaluated = wait_until(loaded, "Prometheus to load and evaluate every rule")
    bad = [(r["name"], r["health"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
    assert not bad, bad
    # recording rules over the traffic produce series, the engine ones in either generation
    for name in (
        "model:gateway_requests:rate5m",
        "model:gateway_request_duration_seconds:p95_5m",
        "upstream_reason:vllm_num_requests_waiting:sum",
        "upstream:vllm_prompt_tokens_cached:ratio_rate5m",
        "upstream_finished_reason:vllm_request_success:ratio_rate5m",
    ):
        wait_until(lambda name=name: stack.query(name), f"{name} to be recorded", timeout=30)
    reasons = {r["metric"]["reason"] for r in stack.query("upstream_reason:vllm_num_requests_waiting:sum")}
    assert reasons == ({"capacity", "deferred"} if stack.generation == "0.33" else {"unknown"})
    rejections = "upstream_reason:vllm_admission_rejections:rate5m"
    if stack.generation == "0.33":
        wait_until(lambda: stack.query(rejections), f"{rejections} to be recorded", timeout=30)
    else:
        assert stack.query(rejections) == []
    # nothing is alerting on a healthy stack
    firing = [a["labels"]["alertname"] for a in stack.api("alerts")["data"]["alerts"] if a["state"] == "firing"]
    assert firing == []


def _exposed_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _gpu_collector_names() -> set[str]:
    collector = GpuCollector()
    try:
        families = list(collector.describe())
    finally:
        collector.close()
    names = set()
    for family in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def test_every_metric_in_rules_and_dashboard_is_really_exposed(stack: Stack) -> None:
    exposed = _exposed(stack)
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used: dict[str, set[str]] = {}
    for rule in _rules():
        for name in metric_names_in_promql(rule["expr"]):
            used.setdefault(name, set()).add(rule.get("record") or rule["alert"])
    for expr in dashboard_queries(DASHBOARD):
        for name in metric_names_in_promql(expr):
            used.setdefault(name, set()).add("dashboard")
    wanted = set(used) - recorded - PROMETHEUS_SERIES
    if stack.generation == "0.11":
        wanted -= MAY_LACK_BEFORE_033 - exposed
    assert any(n.startswith("vllm:") for n in wanted) and any(n.startswith("gateway_") for n in wanted)
    gpu_names = {n for n in wanted if n.startswith("gateway_gpu_")}
    if stack.gpu:
        missing = wanted - exposed
    else:
        missing = (wanted - gpu_names) - exposed
        assert "gateway_gpu_available" in exposed
        unknown_gpu = gpu_names - _gpu_collector_names()
        assert not unknown_gpu, {n: used[n] for n in unknown_gpu}
    assert not missing, {n: sorted(used[n]) for n in missing}
