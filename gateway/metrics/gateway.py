"""The gateway's own series: requests as the client sees them, admission state and upstream state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from gateway import __version__
from gateway.errors import ERROR_TYPES
from gateway.metrics import buckets

# vLLM's bucket sets so gateway and engine panels line up, with short buckets in front for the
# fast endpoints and the gateway's own overhead, and the full 1,048,576-token context at the end.
TTFT_BUCKETS = buckets.TTFT
ITL_BUCKETS = (0.001, 0.005, *buckets.ITL)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, *buckets.REQUEST_LATENCY)
TOKEN_BUCKETS = (*buckets.tokens(1_000_000), 1048576.0)

UNKNOWN_MODEL = "other"
M = TypeVar("M", bound=MetricWrapperBase)
GENERATION_ENDPOINTS = ("chat_completions", "completions")


class GatewayMetrics:
    """Owns a registry; the request path records through ``observe`` with label children cached."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        rl = ("model", "endpoint")
        self.requests = Counter(
            "gateway_requests", "Requests answered, by HTTP status.", (*rl, "status"), registry=registry
        )
        self.errors = Counter(
            "gateway_request_errors",
            "Requests that failed, by error type (see README for the list).",
            (*rl, "error_type"),
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request's arrival to its last byte, as the client sees it.",
            (*rl, "status"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a forwarded request waited for a slot at the gateway.",
            rl,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from arrival to the first content event of a stream, or the first byte otherwise.",
            rl,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Gap between consecutive content events of a stream, as relayed to the client.",
            rl,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.first_byte = Histogram(
            "gateway_upstream_first_byte_seconds",
            "Time from forwarding a request to the engine's response headers (engine queue and prefill).",
            rl,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.relay = Histogram(
            "gateway_relay_seconds",
            "Time from the engine's response headers to the last byte written to the client.",
            rl,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Histogram(
            "gateway_prompt_tokens",
            "Prompt tokens per request: the engine's usage count, else the gateway's estimate.",
            rl,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.completion_tokens = Histogram(
            "gateway_completion_tokens",
            "Completion tokens per request, from the engine's usage count.",
            rl,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests forwarded and not finished.", registry=registry)
        self.queue_depth = Gauge("gateway_queue_depth", "Requests waiting for a slot.", registry=registry)
        self.queue_limit = Gauge("gateway_queue_limit", "Most requests allowed to wait.", registry=registry)
        self.concurrency_limit = Gauge(
            "gateway_concurrency_limit", "Most requests forwarded at once.", registry=registry
        )
        self.tokens_in_flight = Gauge(
            "gateway_tokens_in_flight", "Estimated tokens (prompt + max_tokens) forwarded.", registry=registry
        )
        self.tokens_limit = Gauge(
            "gateway_tokens_in_flight_limit", "Token budget in flight; 0 when off.", registry=registry
        )
        self.upstream_up = Gauge(
            "gateway_upstream_up", "1 when the engine passes health checks.", ("upstream",), registry=registry
        )
        self.upstream_in_flight = Gauge(
            "gateway_upstream_requests_in_flight",
            "Requests in flight per engine.",
            ("upstream",),
            registry=registry,
        )
        self.draining = Gauge("gateway_draining", "1 while the gateway drains before exit.", registry=registry)
        Gauge("gateway_build_info", "Build information; always 1.", ("version",), registry=registry).labels(
            __version__
        ).set(1)
        self._declared: set[str] = set()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def child(self, metric: M, *labels: str) -> M:
        """Label lookups on the hot path: prometheus_client validates each call, a dict does not."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def declare(self, models: Iterable[str]) -> None:
        """Create each error series of a served model at 0, so rate() sees its first increment."""
        for model in models:
            if model in self._declared:
                continue
            self._declared.add(model)
            for endpoint in GENERATION_ENDPOINTS:
                for error_type in ERROR_TYPES:
                    self.child(self.errors, model, endpoint, error_type)
