"""Settings for each command, read from CLI flags and ``GATEWAY_*`` environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

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


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class UpstreamSpec:
    """One ``--upstream``: where the gateway connects (credentials included), how it is shown, its weight."""

    url: str
    name: str  # in logs, labels, /status and errors: the given NAME, else the URL without credentials
    weight: float = 1.0
    stripped_v1: bool = False  # the OpenAI-style base URL's /v1 was removed (the gateway adds the paths)


def redact(url: str) -> str:
    """The URL without its userinfo, query and fragment: what may be shown of an engine's address."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def parse_upstream(text: str) -> UpstreamSpec:
    """``[NAME=]URL[;weight=W]``; raises ValueError saying what is wrong (never showing credentials)."""
    spec, _, options = text.strip().partition(";")
    head, equals, rest = spec.partition("=")
    name = ""
    if equals and "://" not in head:  # NAME=URL; a URL's own "=" can only come after its scheme
        name, spec = head.strip(), rest.strip()
        if not _NAME.fullmatch(name):
            raise ValueError(f"the name {name!r} is not letters, digits, '.', '-' and '_'")
    weight = 1.0
    for item in filter(None, (o.strip() for o in options.split(";"))):
        option_name, _, number = item.partition("=")
        if option_name.strip() != "weight":
            raise ValueError(f"{option_name.strip()!r} is not an upstream option (only weight=W)")
        try:
            weight = float(number)
        except ValueError:
            weight = 0.0
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight must be a number more than 0, got {number!r}")
    parts = urlsplit(spec)
    shown = redact(spec)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{shown!r} is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number up to 65535
    except ValueError:
        raise ValueError(f"{shown!r} has no valid port") from None
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown!r} has a ?query or #fragment, which the gateway would not send")
    if any(c.isspace() for c in spec):  # not a URL (RFC 3986); the workers' coordination lines rely on it too
        raise ValueError(f"{shown!r} has whitespace in it (write a space as %20)")
    url = spec.rstrip("/")
    stripped_v1 = url.endswith("/v1")
    if stripped_v1:
        url = url.removesuffix("/v1")
    return UpstreamSpec(url, name or redact(url), weight, stripped_v1)


def upstream_spec(text: str) -> tuple[str, float]:
    """An ``--upstream`` value's base URL and routing weight."""
    spec = parse_upstream(text)
    return spec.url, spec.weight


def _shown(text: str) -> str:
    """An ``--upstream`` value as /status shows it: its name, its URL without credentials, its weight."""
    spec = parse_upstream(text)
    shown = redact(spec.url) if spec.name == redact(spec.url) else f"{spec.name}={redact(spec.url)}"
    return shown if spec.weight == 1 else f"{shown};weight={spec.weight:g}"


def parse_dns_server(text: str) -> tuple[str, int]:
    """``--dns-server`` as (IP address, port): ``10.96.0.10:53``, ``[fd00::a]:53``, or an address alone for port
    53; raises ValueError."""
    parts = urlsplit("//" + text.strip())
    port = parts.port or 53  # raises ValueError for a port that is not a number up to 65535
    ipaddress.ip_address(parts.hostname or "")
    return str(parts.hostname), port


def _dns_server_ok(text: str) -> bool:
    try:
        parse_dns_server(text)
    except ValueError:
        return False
    return True


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """Options that break a rule, each (field name, rule); ``str`` names each by its flag."""

    def __init__(self, problems: list[tuple[str, str]], others: list[str]) -> None:
        self.problems, self.others = problems, others
        super().__init__("; ".join([*(f"--{_flag(n)} must be {r}" for n, r in problems), *others]))

    def naming(self, sources: Mapping[str, tuple[str, str]], secret: set[str]) -> str:
        """The message with each value named where it came from (the flag or the variable) and shown (a list's
        rule names the bad item itself)."""
        out = []
        for name, rule in self.problems:
            source, raw = sources.get(name, (f"--{_flag(name)}", ""))
            shown = "" if name in secret or not raw else f" (got {raw!r})"
            out.append(f"{source} must be {rule}{shown}")
        return "; ".join([*out, *self.others])


def _flag(name: str) -> str:
    return name.replace("_", "-")


def refuse(rules: Iterable[tuple[str, bool, str]], others: Iterable[str] = ()) -> None:
    """Raise SettingsError for every (field name, holds, rule) that does not hold, and every other problem."""
    problems = [(name, rule) for name, ok, rule in rules if not ok]
    others = list(others)
    if problems or others:
        raise SettingsError(problems, others)


class _Repeat(argparse.Action):
    """Like ``append``, and a comma-separated value counts as several (as in the environment)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, opt: Any = None) -> None:
        current = getattr(ns, self.dest) or []
        setattr(ns, self.dest, [*current, *(v.strip() for v in value.split(",") if v.strip())])


class _Options:
    """Mixin: build an argparse parser from the dataclass fields, then read the environment for what the
    command line did not set, naming the flag or the variable in every error."""

    ENV_PREFIX = "GATEWAY_"

    @classmethod
    def env_name(cls, name: str) -> str:
        return cls.ENV_PREFIX + name.upper()

    @staticmethod
    def _default(f: dataclasses.Field[Any]) -> Any:
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field; every flag defaults to None, so what the command line set is known."""
        for f in fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            flag = "--" + _flag(f.name)
            default = cls._default(f)
            env_name = cls.env_name(f.name)
            if isinstance(default, list):
                shown, more = ",".join(map(str, default)), f"; repeat or comma-separate for several (env {env_name}"
                help_text = f"{meta['help']}{more}, comma-separated; default: {shown or '(none)'})"
            else:
                help_text = f"{meta['help']} (env {env_name}; default: {default})"
            help_text = help_text.replace("%", "%%")
            if isinstance(default, bool):
                parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_text)
            elif isinstance(default, list):
                parser.add_argument(flag, action=_Repeat, dest=f.name, default=None, help=help_text)
            elif meta["choices"]:
                parser.add_argument(flag, type=str.lower, default=None, choices=meta["choices"], help=help_text)
            else:
                parser.add_argument(flag, type=type(default), default=None, help=help_text)

    @classmethod
    def _from_env(cls, f: dataclasses.Field[Any], raw: str) -> Any:
        """A variable's text as the field's value; ValueError naming the variable and its value."""
        default, choices, env_name = cls._default(f), f.metadata["choices"], cls.env_name(f.name)
        if isinstance(default, bool):
            if raw.strip().lower() in _TRUE + _FALSE:
                return raw.strip().lower() in _TRUE
            raise ValueError(f"{env_name}={raw!r} is not a boolean: use true or false (or yes/no, on/off, 1/0)")
        if isinstance(default, list):
            return [v.strip() for v in raw.split(",") if v.strip()]
        if choices:
            if raw.strip().lower() in choices:
                return raw.strip().lower()
            raise ValueError(f"{env_name}={raw!r} is not one of: {', '.join(choices)}")
        try:
            return type(default)(raw)
        except ValueError:
            raise ValueError(f"{env_name}={raw!r} is not a valid {type(default).__name__}") from None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Self:
        """The settings from the command line, else the environment, else the defaults.  Raises ValueError
        naming the flag or the variable each bad value came from, and the value (never a secret's)."""
        values: dict[str, Any] = {}
        sources: dict[str, tuple[str, str]] = {}
        errors = []
        for f in fields(cls):  # type: ignore[arg-type]
            given, env_name = getattr(ns, f.name), cls.env_name(f.name)
            if given is not None:
                values[f.name] = given
                sources[f.name] = (f"--{_flag(f.name)}", "" if isinstance(given, list) else str(given))
            elif env_name in env:
                try:
                    values[f.name] = cls._from_env(f, env[env_name])
                except ValueError as exc:
                    errors.append(str(exc))
                sources[f.name] = (env_name, "" if isinstance(cls._default(f), list) else env[env_name])
        if errors:
            raise ValueError("; ".join(errors))
        try:
            return cls(**values)
        except SettingsError as exc:
            secret = {f.name for f in fields(cls) if f.metadata["secret"]}  # type: ignore[arg-type]
            raise ValueError(exc.naming(sources, secret)) from None

    @classmethod
    def unknown_env(cls, env: Mapping[str, str], *others: str) -> list[str]:
        """The variables of this prefix that set no option (a typo would be ignored in silence); ``others``:
        prefixes of other commands' variables."""
        known = {cls.env_name(f.name) for f in fields(cls)}  # type: ignore[arg-type]
        return sorted(n for n in env if n.startswith(cls.ENV_PREFIX) and n not in known and not n.startswith(others))

    @classmethod
    def from_args(cls, argv: list[str], env: Mapping[str, str] = os.environ) -> Self:
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), env)

    def public(self) -> dict[str, Any]:
        """Effective settings for the /status page, secrets masked, upstreams without their credentials."""
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
        0,
        "context window in tokens for every model; 0 = each model's max_model_len from its engine's /v1/models "
        "(1048576 until an engine has answered)",
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
        "",
        "key sent to every engine as Authorization: Bearer (vLLM's --api-key), on requests, checks and scrapes",
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
    client_send_timeout: float = option(
        60.0, "seconds a client may leave what it is sent unread (its socket full) before it is dropped"
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
    dns_interval: float = option(
        30.0,
        "seconds between resolutions of each http:// --upstream given by a DNS name: each address is an engine "
        "(README: Discovery); 0 = off, a name is one engine",
    )
    dns_server: str = option(
        "", "IP[:PORT] of the DNS server discovery asks instead of the system resolver (needs glm-gateway[dns])"
    )
    glm_stop_tokens: bool = option(True, "add GLM-4's stop_token_ids when a GLM-4 model is served and none are sent")
    api_key: list[str] = option([], "API key clients must send (as vLLM's --api-key)", repeat=True, secret=True)
    keys_file: str = option("", "TOML file of API keys with names, SHA-256 digests and limits (README: Access)")
    limits_redis: str = option(
        "", "redis://HOST:PORT/DB holding the per-key rate limits that all replicas share", secret=True
    )
    replicas: int = option(1, "gateway replicas sharing the limits: while Redis is down each allows limit / this")
    metrics_host: str = option("127.0.0.1", "address of the separate /metrics and /status listener")
    metrics_port: int = option(0, "port of a separate listener for /metrics and /status, without keys; 0 = none")
    log_format: str = option("text", "log format on stderr: text, or json (an object a line)", choices=("text", "json"))
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    access_log: str = option(
        "text", "one line per finished request on stdout: text (logfmt), json or off", choices=("text", "json", "off")
    )
    workers: str = option(
        "1", "worker processes serving the port, supervised by one parent; auto = the cores available"
    )
    relay_splice: str = option(
        "auto",
        "the relay's per-token path: auto (in C where it was built), c (refuse to start without it) or python",
        choices=("auto", "c", "python"),
    )

    def __post_init__(self) -> None:
        """Refuse at start what would only fail later, at 3 a.m.: each rule names the option."""
        refuse(
            (
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
                ("client_send_timeout", self.client_send_timeout > 0, "more than 0"),
                ("max_connections", self.max_connections >= 1, "at least 1"),
                (
                    "api_key",
                    all(self.api_key) and not (self.api_key and self.keys_file),
                    "not empty, nor with a keys file",
                ),
                ("replicas", self.replicas >= 1, "at least 1"),
                (
                    "workers",
                    self.workers == "auto" or (self.workers.isdecimal() and int(self.workers) >= 1),
                    "auto or at least 1",
                ),
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
                ("dns_interval", self.dns_interval >= 0, "0 (off) or more"),
                ("dns_server", not self.dns_server or _dns_server_ok(self.dns_server), "an IP address[:PORT]"),
                (
                    "relay_splice",
                    self.relay_splice != "c" or importlib.util.find_spec("gateway._splice") is not None,
                    "auto or python: this install has no C splice (it was built without a C compiler)",
                ),
                *self._upstream_rules(),
            ),
            self._access_problems(),
        )

    @property
    def worker_count(self) -> int:
        """``--workers`` as a number: ``auto`` is the cores this process may run on."""
        return len(os.sched_getaffinity(0)) if self.workers == "auto" else int(self.workers)

    def _upstream_rules(self) -> list[tuple[str, bool, str]]:
        """One or more engines, each ``[NAME=]URL[;weight=W]`` with names that tell them apart."""
        rule = "one or more http:// or https:// URLs, each [NAME=]URL[;weight=W] (W > 0)"
        if not self.upstream:
            return [("upstream", False, f"{rule}: none given")]
        out, names = [], []
        for text in self.upstream:
            try:
                names.append(parse_upstream(text).name)
            except ValueError as exc:
                out.append(("upstream", False, f"{rule}: {exc}"))
        twice = sorted({n for n in names if names.count(n) > 1})
        # the checks' client cannot send both: a URL's user:password@ is the engine's Basic authentication
        both = bool(self.upstream_api_key) and any("@" in urlsplit(parse_upstream(t).url).netloc for t in self.upstream)
        return [
            *out,
            ("upstream", not twice, f"{rule}, each named once: {', '.join(twice)} is given twice"),
            ("upstream", bool(out) or not both, "without user:password@ with --upstream-api-key (one or the other)"),
        ]

    def public(self) -> dict[str, Any]:
        out = super().public()
        out["upstream"] = [_shown(text) for text in self.upstream]
        return out

    def _access_problems(self) -> list[str]:
        """A keys file that does not load, or an option whose client library is not installed."""
        out = []
        if self.keys_file:
            try:
                keys.load(self.keys_file)
            except (OSError, ValueError) as exc:
                out.append(f"--keys-file {self.keys_file}: {exc}")
        if self.limits_redis and importlib.util.find_spec("redis") is None:
            out.append("--limits-redis needs the redis client: pip install 'glm-gateway[redis]'")
        if self.dns_server and importlib.util.find_spec("dns") is None:
            out.append("--dns-server needs dnspython: pip install 'glm-gateway[dns]'")
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
        refuse(
            (
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
        )
