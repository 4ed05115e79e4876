"""Settings for each command, read from CLI flags and ``GATEWAY_*`` environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

from gateway.access import keys

MiB = 1024 * 1024


def option(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, repeat: bool = False, secret: bool = False
) -> Any:
    """Declare one option: its default, help text and parsing hints live beside the field; a secret is never
    shown (``public``)."""
    meta = {"help": help, "choices": choices, "repeat": repeat, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def upstream_spec(text: str) -> tuple[str, float]:
    """An ``--upstream`` value, ``URL`` or ``URL;weight=W``: the engine's base URL and its routing weight."""
    url, _, options = text.partition(";")
    weight = 1.0
    for item in filter(None, (o.strip() for o in options.split(";"))):
        name, _, number = item.partition("=")
        if name.strip() != "weight":
            raise ValueError(f"unknown upstream option {name.strip()!r}")
        weight = float(number)
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight must be more than 0, got {number}")
    return url.strip().rstrip("/"), weight


def _valid_upstream(text: str) -> bool:
    try:
        url, _ = upstream_spec(text)
    except ValueError:
        return False
    return url.startswith(("http://", "https://"))


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


class _Repeat(argparse.Action):
    """Like ``append``, but values on the command line replace the default instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, opt: Any = None) -> None:
        current = getattr(ns, self.dest)
        setattr(ns, self.dest, [value] if current is self.default else [*current, value])


class _Options:
    """Mixin: build an argparse parser from the dataclass fields and read the environment."""

    ENV_PREFIX = "GATEWAY_"

    @classmethod
    def env_name(cls, name: str) -> str:
        return cls.ENV_PREFIX + name.upper()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, env: Mapping[str, str] = os.environ) -> None:
        for f in fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            env_name = cls.env_name(f.name)
            help_text = f"{meta['help']} (env {env_name}; default: %(default)s)"
            if isinstance(default, bool):
                value = _parse_bool(env[env_name]) if env_name in env else default
                parser.add_argument(flag, default=value, action=argparse.BooleanOptionalAction, help=help_text)
                continue
            kind = (type(default[0]) if default else str) if isinstance(default, list) else type(default)
            if meta["repeat"]:
                value = [v.strip() for v in env[env_name].split(",") if v.strip()] if env_name in env else default
                parser.add_argument(
                    flag,
                    action=_Repeat,
                    type=kind,
                    dest=f.name,
                    default=value,
                    help=f"{meta['help']}; repeat for several (env {env_name}, comma-separated; "
                    f"default: {','.join(map(str, default))})",
                )
                continue
            value = default
            if env_name in env:
                try:
                    value = kind(env[env_name])
                except ValueError:
                    parser.error(f"{env_name}={env[env_name]!r} is not a valid {kind.__name__}")
            parser.add_argument(flag, type=kind, default=value, choices=meta["choices"], help=help_text)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Self:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, argv: list[str], env: Mapping[str, str] = os.environ) -> Self:
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser, env)
        return cls.from_namespace(parser.parse_args(argv))

    def public(self) -> dict[str, Any]:
        """Effective settings for the /status page, secrets masked."""
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        for f in fields(self):  # type: ignore[arg-type]
            if f.metadata["secret"] and out[f.name]:
                out[f.name] = "(set)"
        return out


@dataclass(frozen=True)
class Settings(_Options):
    """Options of ``glm-gateway serve``."""

    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(8080, "port to listen on")
    upstream: list[str] = option(["http://127.0.0.1:8000"], "base URL of a vLLM engine", repeat=True)
    max_body_bytes: int = option(16 * MiB, "largest request body accepted, in bytes (413 above)")
    context_window: int = option(
        0, "context window in tokens; 0 = the engine's max_model_len from /v1/models, else 1048576"
    )
    max_concurrency: int = option(256, "requests forwarded to the engines at once")
    max_queue: int = option(1024, "requests waiting for a slot (429 above)")
    queue_timeout: float = option(60.0, "seconds a request may wait for a slot (503 after)")
    max_tokens_in_flight: int = option(
        0, "budget of estimated tokens (prompt + max_tokens) of all forwarded requests; 0 = off"
    )
    upstream_connect_timeout: float = option(10.0, "seconds to open a connection to an engine")
    upstream_read_timeout: float = option(
        3600.0, "seconds an engine may stay silent (a 1M-token prefill takes many minutes)"
    )
    upstream_api_key: str = option(
        "", "key sent to every engine as Authorization: Bearer (vLLM's --api-key), on requests, checks and scrapes",
        secret=True,
    )
    stream_heartbeat: float = option(
        10.0,
        "seconds a stream may wait for its first token (queued or in prefill) before the gateway sends the 200 "
        "and an SSE comment every this many seconds; 0 = off",
    )
    health_interval: float = option(5.0, "seconds between health checks of each engine")
    health_timeout: float = option(5.0, "seconds an engine's /health may take")
    health_fail_threshold: int = option(3, "failed checks in a row that mark an engine down")
    health_success_threshold: int = option(2, "good checks in a row that bring an engine back")
    drain_timeout: float = option(60.0, "seconds in-flight requests may run on after SIGTERM")
    client_header_timeout: float = option(15.0, "seconds a client may take to send a whole request head (408 after)")
    client_body_timeout: float = option(30.0, "seconds a request body may go without a byte arriving (408 after)")
    keepalive_timeout: float = option(
        75.0, "seconds an idle client keep-alive connection stays open: keep it above a load balancer's idle timeout"
    )
    max_connections: int = option(10000, "client connections open at once; beyond it a 503 and the connection closed")
    engine_metrics_timeout: float = option(2.0, "seconds an engine's /metrics may take during a scrape")
    engine_metrics_max_age: float = option(1.0, "engine /metrics are fetched at most once per this many seconds")
    routing: str = option(
        "least-load", "how an engine is chosen (README: Several engines)", choices=("least-load", "session", "prefix")
    )
    session_header: str = option("x-session-id", "header naming a session for --routing session; else `user`")
    kv_headroom: float = option(0.9, "share of each engine's KV cache that requests may fill")
    engine_load_interval: float = option(1.0, "seconds between reads of each engine's load from its /metrics")
    retries: int = option(2, "times a request may move to another engine before the client got a byte")
    retry_budget: float = option(0.2, "retries allowed, as a share of the requests of the last 10 s")
    breaker_failures: int = option(5, "failures in a row that open an engine's circuit breaker; 0 = off")
    breaker_cooldown: float = option(10.0, "seconds an open breaker waits before one probe request")
    slow_start: float = option(30.0, "seconds over which an engine that came back ramps up to its full share")
    glm_stop_tokens: bool = option(True, "add GLM-4's stop_token_ids when a GLM-4 model is served and none are sent")
    api_key: list[str] = option([], "API key clients must send (as vLLM's --api-key)", repeat=True, secret=True)
    keys_file: str = option("", "TOML file of API keys with names, SHA-256 digests and limits (README: Access)")
    limits_redis: str = option(
        "", "redis://HOST:PORT/DB holding the per-key rate limits that all replicas share", secret=True
    )
    replicas: int = option(1, "gateway replicas sharing the limits: while Redis is down each allows limit / this")
    metrics_host: str = option("127.0.0.1", "address of the separate /metrics and /status listener")
    metrics_port: int = option(0, "port of a separate listener for /metrics and /status, without keys; 0 = none")
    log_format: str = option("text", "log format", choices=("text", "json"))
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        """Refuse at start what would only fail later, at 3 a.m.: each rule names the option."""
        problems = [
            f"--{name.replace('_', '-')} must be {rule}"
            for name, ok, rule in (
                ("port", 0 <= self.port <= 65535, "a port number"),
                ("max_body_bytes", self.max_body_bytes >= 1, "at least 1"),
                ("context_window", self.context_window >= 0, "0 (from the engine) or more"),
                ("max_concurrency", self.max_concurrency >= 1, "at least 1"),
                ("max_queue", self.max_queue >= 0, "0 or more"),
                ("queue_timeout", self.queue_timeout > 0, "more than 0"),
                ("max_tokens_in_flight", self.max_tokens_in_flight >= 0, "0 (off) or more"),
                ("upstream_connect_timeout", self.upstream_connect_timeout > 0, "more than 0"),
                ("upstream_read_timeout", self.upstream_read_timeout > 0, "more than 0"),
                ("stream_heartbeat", self.stream_heartbeat >= 0, "0 (off) or more"),
                ("health_interval", self.health_interval > 0, "more than 0"),
                ("health_timeout", self.health_timeout > 0, "more than 0"),
                ("health_fail_threshold", self.health_fail_threshold >= 1, "at least 1"),
                ("health_success_threshold", self.health_success_threshold >= 1, "at least 1"),
                ("drain_timeout", self.drain_timeout >= 0, "0 or more"),
                ("client_header_timeout", self.client_header_timeout > 0, "more than 0"),
                ("client_body_timeout", self.client_body_timeout > 0, "more than 0"),
                ("keepalive_timeout", self.keepalive_timeout > 0, "more than 0"),
                ("max_connections", self.max_connections >= 1, "at least 1"),
                (
                    "api_key",
                    all(self.api_key) and not (self.api_key and self.keys_file),
                    "not empty, nor with a keys file",
                ),
                ("replicas", self.replicas >= 1, "at least 1"),
                ("metrics_port", 0 <= self.metrics_port <= 65535, "a port number"),
                (
                    "limits_redis",
                    not self.limits_redis or self.limits_redis.startswith(("redis://", "rediss://", "unix://")),
                    "a redis://, rediss:// or unix:// URL",
                ),
                ("engine_metrics_timeout", self.engine_metrics_timeout > 0, "more than 0"),
                ("engine_metrics_max_age", self.engine_metrics_max_age >= 0, "0 or more"),
                ("session_header", bool(self.session_header.strip()), "a header name"),
                ("kv_headroom", 0 < self.kv_headroom <= 1, "more than 0 and at most 1"),
                ("engine_load_interval", self.engine_load_interval > 0, "more than 0"),
                ("retries", self.retries >= 0, "0 or more"),
                ("retry_budget", 0 <= self.retry_budget <= 1, "from 0 to 1"),
                ("breaker_failures", self.breaker_failures >= 0, "0 (off) or more"),
                ("breaker_cooldown", self.breaker_cooldown > 0, "more than 0"),
                ("slow_start", self.slow_start >= 0, "0 (off) or more"),
                (
                    "upstream",
                    bool(self.upstream) and all(_valid_upstream(u) for u in self.upstream),
                    "one or more http:// or https:// URLs, each optionally with ;weight=W (W > 0)",
                ),
            )
            if not ok
        ]
        problems.extend(self._access_problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _access_problems(self) -> list[str]:
        """A keys file that does not load, or Redis limits without the redis client installed."""
        out = []
        if self.keys_file:
            try:
                keys.load(self.keys_file)
            except (OSError, ValueError) as exc:
                out.append(f"--keys-file {self.keys_file}: {exc}")
        if self.limits_redis and importlib.util.find_spec("redis") is None:
            out.append("--limits-redis needs the redis client: pip install 'glm-gateway[redis]'")
        return out


@dataclass(frozen=True)
class SimSettings(_Options):
    """Options of ``glm-gateway sim``, the simulated vLLM engine."""

    ENV_PREFIX = "GATEWAY_SIM_"

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    model: str = option("glm-4-9b-chat-1m", "served model name")
    max_model_len: int = option(1048576, "context window in tokens")
    max_num_seqs: int = option(256, "requests generated at once; the rest wait in the engine's queue")
    ttft: float = option(0.05, "seconds to the first token of a 1-token prompt")
    prefill_tokens_per_s: float = option(20000.0, "prefill speed: time to first token grows by prompt/this")
    itl: float = option(0.01, "seconds between output tokens")
    output_tokens: int = option(16, "tokens generated when the request sets no max_tokens")
    kv_cache_tokens: int = option(
        600000, "KV cache size in tokens (16-token blocks), for vllm:kv_cache_usage_perc and vllm:cache_config_info"
    )
    vllm_compat: str = option(
        "0.33", "vLLM generation to imitate (README: the sim's generations)", choices=("0.33", "0.11")
    )
    sse_keep_alive_interval: float = option(
        0.0, "seconds a stream may be idle before a ': keep-alive' comment (0.33); 0 = off"
    )
    max_num_queued_reqs: int = option(
        0, "unfinished requests (running + waiting) beyond which the engine answers 503 busy (0.33); 0 = unbounded"
    )
    api_key: str = option("", "key clients must send as Authorization: Bearer on /v1/* (vLLM's --api-key)", secret=True)
    log_level: str = option("warning", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        """Refuse at start what would only fail later (a hung engine, a traceback): each rule names the option."""
        modern = self.vllm_compat == "0.33"
        problems = [
            f"--{name.replace('_', '-')} must be {rule}"
            for name, ok, rule in (
                ("port", 0 <= self.port <= 65535, "a port number"),
                ("max_model_len", self.max_model_len >= 1, "at least 1"),
                ("max_num_seqs", self.max_num_seqs >= 1, "at least 1"),
                ("ttft", self.ttft >= 0, "0 or more"),
                ("prefill_tokens_per_s", self.prefill_tokens_per_s > 0, "more than 0"),
                ("itl", self.itl >= 0, "0 or more"),
                ("output_tokens", self.output_tokens >= 1, "at least 1"),
                ("kv_cache_tokens", self.kv_cache_tokens >= 16, "at least 16 (one block)"),
                ("vllm_compat", self.vllm_compat in ("0.33", "0.11"), "0.33 or 0.11"),
                ("sse_keep_alive_interval", self.sse_keep_alive_interval >= 0, "0 (off) or more"),
                ("sse_keep_alive_interval", modern or not self.sse_keep_alive_interval, "0 with --vllm-compat 0.11"),
                ("max_num_queued_reqs", self.max_num_queued_reqs >= 0, "0 (unbounded) or more"),
                ("max_num_queued_reqs", modern or not self.max_num_queued_reqs, "0 with --vllm-compat 0.11"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))
