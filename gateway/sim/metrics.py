"""vLLM's V1 ``/metrics`` names, types, labels and buckets, as the simulated engine exposes them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics import buckets


class VllmMetrics:
    """The series a vLLM 0.11 engine exports, labelled ``model_name`` and ``engine``."""

    def __init__(self, model: str, max_model_len: int) -> None:
        self.registry = r = CollectorRegistry()
        labels = ("model_name", "engine")
        values = (model, "0")

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.running = Gauge("vllm:num_requests_running", "Requests in model execution batches.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels, registry=r)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption.", labels, registry=r)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels,
            registry=r,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels,
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*labels, "finished_reason"),
            registry=r,
        )
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", buckets.TTFT
        )
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", buckets.ITL)
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            buckets.REQUEST_LATENCY,
        )
        self.queue_time = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            buckets.REQUEST_LATENCY,
        )
        self.inference_time = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            buckets.REQUEST_LATENCY,
        )
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            buckets.REQUEST_LATENCY,
        )
        self.decode_time = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            buckets.REQUEST_LATENCY,
        )
        self.prompt_hist = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", buckets.tokens(max_model_len)
        )
        self.generation_hist = hist(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            buckets.tokens(max_model_len),
        )
        # bind the label values once: every series of this engine carries the same pair
        for name in (
            "running waiting kv_usage prompt_tokens generation_tokens preemptions prefix_queries prefix_hits "
            "ttft itl e2e queue_time inference_time prefill_time decode_time prompt_hist generation_hist"
        ).split():
            setattr(self, name, getattr(self, name).labels(*values))
        self._success_labels = values

    def finished(self, reason: str) -> None:
        self.success.labels(*self._success_labels, reason).inc()
