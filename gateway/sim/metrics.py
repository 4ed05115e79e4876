"""vLLM's V1 ``/metrics`` names, types, labels and buckets, as the simulated engine exposes them per generation."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics import buckets
from gateway.sim.generations import BLOCK_SIZE, Generation, cache_config_info

ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")


class VllmMetrics:
    """The series a vLLM engine of ``generation`` exports, labelled ``model_name`` and ``engine``: 0.11's set,
    and with 0.33 the series it added (cache_config_info, waiting_by_reason, prompt_tokens_cached, ...)."""

    def __init__(self, model: str, max_model_len: int, kv_cache_tokens: int, generation: Generation) -> None:
        self.registry = r = CollectorRegistry()
        self.generation = generation
        labels = ("model_name", "engine")
        values = (model, "0")

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self.running = Gauge("vllm:num_requests_running", "Requests in model execution batches.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels, registry=r)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
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
        bound = (
            "running waiting kv_usage prompt_tokens generation_tokens preemptions prefix_queries prefix_hits "
            "ttft itl e2e queue_time inference_time prefill_time decode_time prompt_hist generation_hist"
        ).split()
        if generation.new_series:
            self._add_033_series(r, labels, values, max_model_len, kv_cache_tokens)
            bound += ["prompt_tokens_cached", "prefill_kv_computed"]
        for name in bound:
            setattr(self, name, getattr(self, name).labels(*values))
        self._values = values
        for reason in generation.finished_reasons:  # vLLM creates every finished_reason series at start
            self.success.labels(*values, reason)

    def _add_033_series(
        self,
        r: CollectorRegistry,
        labels: tuple[str, str],
        values: tuple[str, str],
        max_model_len: int,
        kv_cache_tokens: int,
    ) -> None:
        self.waiting_by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            (*labels, "reason"),
            registry=r,
        )
        self.waiting_by_reason.labels(*values, "deferred").set(0)
        self.sleep_state = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            (*labels, "sleep_state"),
            registry=r,
        )
        for state in SLEEP_STATES:
            self.sleep_state.labels(*values, state).set(1 if state == "awake" else 0)
        self.prompt_tokens_cached = Counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", labels, registry=r
        )
        self.prefill_kv_computed = Histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            labels,
            buckets=buckets.tokens(max_model_len),
            registry=r,
        )
        self.admission_rejections = Counter(
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            ("model_name", "reason"),
            registry=r,
        )
        for reason in ADMISSION_REASONS:
            self.admission_rejections.labels(values[0], reason)
        config = cache_config_info(kv_cache_tokens)
        info = Gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", (*config, "engine"), registry=r
        )
        info.labels(*config.values(), values[1]).set(1)

    def finished(self, reason: str) -> None:
        self.success.labels(*self._values, reason).inc()

    def scheduler(self, running: int, waiting: int, kv_tokens: int, kv_cache_tokens: int) -> None:
        """The scheduler's gauges as of now (set when /metrics is read)."""
        self.running.set(running)
        self.waiting.set(waiting)
        capacity = kv_cache_tokens // BLOCK_SIZE * BLOCK_SIZE
        self.kv_usage.set(min(1.0, kv_tokens / capacity))
        if self.generation.new_series:
            self.waiting_by_reason.labels(*self._values, "capacity").set(waiting)

    def prefilled(self, prompt: int, cached: int) -> None:
        """A prefill of ``prompt`` tokens of which ``cached`` came from the prefix cache."""
        self.prompt_tokens.inc(prompt)
        self.prefix_queries.inc(prompt)
        self.prefix_hits.inc(cached)
        if self.generation.new_series:
            self.prompt_tokens_cached.inc(cached)

    def completed(self, prompt: int, cached: int, generated: int, reason: str) -> None:
        """A request that ran to its end: the per-request histograms and its finished_reason."""
        self.prompt_hist.observe(prompt)
        self.generation_hist.observe(generated)
        if self.generation.new_series:
            self.prefill_kv_computed.observe(prompt - cached)
        self.finished(reason)

    def rejected(self, reason: str) -> None:
        self.admission_rejections.labels(self._values[0], reason).inc()
