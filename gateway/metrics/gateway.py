"""The gateway's own series: requests as the client sees them, admission state and upstream state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway import __version__
from gateway.access.keys import ANONYMOUS
from gateway.errors import ERROR_TYPES
from gateway.metrics import buckets
from gateway.metrics.histogram import Histogram

# vLLM's bucket sets so gateway and engine panels line up, with short buckets in front for the
# fast endpoints and the gateway's own overhead, and the full 1,048,576-token context at the end.
TTFT_BUCKETS = buckets.TTFT
ITL_BUCKETS = (0.001, 0.005, *buckets.ITL)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, *buckets.REQUEST_LATENCY)
TOKEN_BUCKETS = (*buckets.tokens(1_000_000), 1048576.0)

UNKNOWN_MODEL = "other"
# TTFT grows with the prompt: one band label, five values (plus "none" for requests without a prompt)
PROMPT_BANDS = ((8192, "8k"), (32768, "32k"), (131072, "128k"), (524288, "512k"), (1048576, "1m"))
NO_PROMPT_BAND = "none"
PREFILL_SPEED_BUCKETS = (*buckets.tokens(1_000_000)[3:], 2_000_000.0)  # 10 .. 2M tokens per second
CLIENT_PHASES = ("queued", "prefill", "decode")
C = TypeVar("C", covariant=True)
GENERATION_ENDPOINTS = ("chat_completions", "completions")


class Labelled(Protocol[C]):
    """A metric with labels: prometheus_client's, or the loop's own histograms."""

    def labels(self, *values: str) -> C: ...


class GatewayMetrics:
    """Owns a registry; the request path records through ``observe`` with label children cached."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        rl = ("model", "endpoint")
        self.requests = Counter(
            "gateway_requests", "Requests answered, by HTTP status and API key name.", (*rl, "status", "key"),
            registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "gateway_request_errors",
            "Requests that failed, by error type (see README for the list) and API key name.",
            (*rl, "error_type", "key"),
            registry=registry,
        )
        self.key_names: tuple[str, ...] = (ANONYMOUS,)  # the key label's values: the keys file's names
        self.key_tokens = Counter(
            "gateway_key_tokens",
            "Tokens of answered requests per API key, from the engine's usage count.",
            ("key", "kind"),
            registry=registry,
        )
        self.key_in_flight = Gauge(
            "gateway_key_requests_in_flight", "Requests forwarded per API key.", ("key",), registry=registry
        )
        self.key_queue_depth = Gauge(
            "gateway_key_queue_depth", "Requests waiting for a slot per API key.", ("key",), registry=registry
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused with 429 rate_limited, by API key and the limit hit (requests, tokens).",
            ("key", "limit"),
            registry=registry,
        )
        self.keys_loaded = Gauge("gateway_keys", "API keys in force.", registry=registry)
        self.keys_reload_failed = Gauge(
            "gateway_keys_reload_failed",
            "1 while the keys file's last reload failed (the previous keys stay in force).",
            registry=registry,
        )
        self.limits_redis_up = Gauge(
            "gateway_limits_redis_up",
            "1 while the rate limits are shared through Redis, 0 while local ones of limit / replicas apply.",
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
            "Time from arrival to the first content event of a stream, or the first byte otherwise, by the "
            "prompt's size band (tokens: 8k, 32k, 128k, 512k, 1m; none without a prompt).",
            (*rl, "prompt_band"),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.prefill_speed = Histogram(
            "gateway_prefill_tokens_per_second",
            "Prompt tokens of a stream over the engine's time to its first token (its queue and prefill).",
            ("model",),
            buckets=PREFILL_SPEED_BUCKETS,
            registry=registry,
        )
        self.aborted_tokens = Counter(
            "gateway_aborted_tokens",
            "Prompt tokens (estimated) of requests whose client left, by the phase it left in.",
            ("phase",),
            registry=registry,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Clients that left before their answer was complete, by the phase they left in.",
            ("phase",),
            registry=registry,
        )
        for phase in CLIENT_PHASES:
            self.aborted_tokens.labels(phase)
            self.client_disconnects.labels(phase)
        self.read_timeout = Gauge(
            "gateway_upstream_read_timeout_seconds",
            "--upstream-read-timeout: how long an engine may stay silent (the oldest-request alert's horizon).",
            registry=registry,
        )
        self.oldest_age = Gauge(
            "gateway_oldest_request_age_seconds",
            "Age of the oldest request waiting in the gateway's queue or forwarded to an engine.",
            ("phase",),
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
        self.retries = Counter(
            "gateway_retries",
            "Requests moved to another engine before the client got a byte, by the engine left and why.",
            ("upstream", "reason"),
            registry=registry,
        )
        self.routing_decisions = Counter(
            "gateway_routing_decisions",
            "Engines chosen, by policy and why: affinity, fallback (the key's engine was down, full or over its "
            "bound), least_load, retry.",
            ("upstream", "policy", "reason"),
            registry=registry,
        )
        self.affinity_moves = Counter(
            "gateway_affinity_moves", "Keyed requests sent to another engine than their key's own.", registry=registry
        )
        self.breaker_state = Gauge(
            "gateway_upstream_breaker_state",
            "Circuit breaker per engine: 0 closed, 1 half-open, 2 open.",
            ("upstream",),
            registry=registry,
        )
        self.kv_free = Gauge(
            "gateway_upstream_kv_free_tokens",
            "KV cache tokens free for new requests per engine (capacity x --kv-headroom minus use); NaN when the "
            "engine does not report its KV cache.",
            ("upstream",),
            registry=registry,
        )
        self.dns_resolutions = Counter(
            "gateway_dns_resolutions",
            "Resolutions of the --upstream DNS names, by result: ok, no_address (the name has no A or AAAA "
            "record), error (timeout, server failure); on any but ok the engines stay as last resolved.",
            ("result",),
            registry=registry,
        )
        self.upstream_changes = Counter(
            "gateway_upstream_changes",
            "Engines that DNS discovery added to the pool or removed from it.",
            ("change",),
            registry=registry,
        )
        self.draining = Gauge("gateway_draining", "1 while the gateway drains before exit.", registry=registry)
        self.client_connections = Gauge(
            "gateway_client_connections", "Client connections open (--max-connections caps them).", registry=registry
        )
        self.client_connections_closed = Counter(
            "gateway_client_connections_closed",
            "Client connections the gateway closed itself, by reason: header_timeout, body_timeout, send_timeout, "
            "max_connections (refused at accept), bad_version, malformed (refused by the HTTP parser).",
            ("reason",),
            registry=registry,
        )
        Gauge("gateway_build_info", "Build information; always 1.", ("version",), registry=registry).labels(
            __version__
        ).set(1)
        self._declared: set[str] = set()
        self._children: dict[tuple[Labelled[Any], tuple[str, ...]], Any] = {}

    def child(self, metric: Labelled[C], *labels: str) -> C:
        """Label lookups on the hot path: prometheus_client validates each call, a dict does not."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def forget(self, upstream: str) -> None:
        """Remove every series of an engine that left the pool, and the cached children that would bring them
        back."""
        per_engine = (
            self.upstream_up, self.upstream_in_flight, self.retries, self.routing_decisions, self.breaker_state,
            self.kv_free,
        )  # fmt: skip
        for metric in per_engine:
            metric.remove_by_labels({"upstream": upstream})
        for key in [k for k in self._children if k[0] in per_engine and k[1][0] == upstream]:
            del self._children[key]

    @staticmethod
    def prompt_band(prompt_tokens: int | None) -> str:
        if prompt_tokens is None:
            return NO_PROMPT_BAND
        for limit, band in PROMPT_BANDS:
            if prompt_tokens <= limit:
                return band
        return PROMPT_BANDS[-1][1]

    def declare(self, models: Iterable[str]) -> None:
        """Create each error series of a served model at 0, so rate() sees its first increment."""
        for model in models:
            if model in self._declared:
                continue
            self._declared.add(model)
            for endpoint in GENERATION_ENDPOINTS:
                for error_type in ERROR_TYPES:
                    for key in self.key_names:
                        self.child(self.errors, model, endpoint, error_type, key)
