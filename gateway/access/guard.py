"""The access stage of the request path: who asks (401), what the key may send (403, 400), its rate limits
(429, charged at admission and settled at the end), the x-ratelimit-* headers, and the keys' reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.access.keys import ANONYMOUS, Key, KeyRing
from gateway.access.limits import Decision, Limiter, LocalStore, RedisStore, Store
from gateway.errors import GatewayError
from gateway.headers import request_id

if TYPE_CHECKING:
    from gateway.admission import Admission
    from gateway.exchange import Exchange
    from gateway.metrics.gateway import GatewayMetrics
    from gateway.protocol import Generation
    from gateway.settings import Settings

log = logging.getLogger("gateway.access")

DECISION = web.RequestKey("rate_limit_decision", Decision)
_WATCH_INTERVAL = 1.0  # seconds between looks at the keys file's modification time
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def presented_key(request: web.Request) -> str:
    """The key from ``Authorization: Bearer`` (what the openai SDKs send), else from ``x-api-key``."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return request.headers.get("x-api-key", "").strip()


def _unknown_key() -> GatewayError:
    return GatewayError(
        "invalid_api_key", "Missing or unknown API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'."
    )


class Access:
    """The keys in force, their limits and their place in the fair queue; the proxy calls ``authenticate``
    before reading a body and ``charge`` before admission, and ``finish`` settles every request at its end."""

    def __init__(self, ring: KeyRing, store: Store, admission: Admission, metrics: GatewayMetrics) -> None:
        self.ring = ring
        self.limiter = Limiter(store)
        self.admission = admission
        self.metrics = metrics
        self._charged: dict[Exchange, tuple[Key, int]] = {}  # tokens taken at admission, until settled
        self.watch = True  # SIGHUP and the file's changes; off in a worker of --workers (its parent tells it)
        self._configure()

    @classmethod
    def from_settings(cls, settings: Settings, admission: Admission, metrics: GatewayMetrics) -> Access | None:
        ring = KeyRing.from_settings(settings.api_key, settings.keys_file)
        if ring is None:
            return None
        store: Store = RedisStore(settings.limits_redis, settings.replicas) if settings.limits_redis else LocalStore()
        return cls(ring, store, admission, metrics)

    def _configure(self) -> None:
        """Apply the keys in force: fair-queue weights and caps, and each key's series at 0."""
        m, fair = self.metrics, self.admission.fair
        names = self.ring.names()
        m.key_names = (ANONYMOUS, *names)
        m.keys_loaded.set(len(names))
        m.keys_reload_failed.set(self.ring.reload_failed)
        for key in self.ring.keys.values():
            if fair is not None:
                fair.configure(key.name, key.weight, key.max_concurrency)
                tenant = fair.tenant(key.name)
                m.key_in_flight.labels(key.name).set_function(lambda t=tenant: t.in_flight)
                m.key_queue_depth.labels(key.name).set_function(lambda t=tenant: len(t.waiters))
            for kind in ("prompt", "completion"):
                m.key_tokens.labels(key.name, kind)
            for limit in ("requests", "tokens"):
                m.rate_limited.labels(key.name, limit)

    def reload(self) -> None:
        self.ring.reload()
        self._configure()

    # -- the request path -----------------------------------------------------------------------------

    def authenticate(self, request: web.Request, ex: Exchange) -> Key:
        presented = presented_key(request)
        key = self.ring.lookup(presented) if presented else None
        if key is None:
            raise _unknown_key()
        ex.key = key.name
        return key

    async def charge(self, request: web.Request, key: Key, gen: Generation | None, cost: int, ex: Exchange) -> None:
        """The key's model list and prompt cap, then its rate limits: ``cost`` tokens taken until settled."""
        if ex.model and not key.may_use(ex.model):
            raise GatewayError("model_not_allowed", f"This API key may not use the model {ex.model!r}.", param="model")
        if gen is not None:
            if key.max_prompt_tokens and gen.prompt_tokens > key.max_prompt_tokens:
                raise GatewayError(
                    "max_prompt_tokens",
                    f"The prompt has about {gen.prompt_tokens} tokens, more than this API key's max_prompt_tokens "
                    f"of {key.max_prompt_tokens}. Shorten the prompt.",
                    param="messages" if request.path.endswith("chat/completions") else "prompt",
                )
        if not key.limited:
            return
        if key.tokens_per_minute and cost > key.tokens_per_minute:
            self.metrics.child(self.metrics.rate_limited, key.name, "tokens").inc()
            raise GatewayError(
                "rate_limited",
                f"This request needs about {cost} tokens (prompt + max_tokens), more than this API key's whole "
                f"tokens_per_minute of {key.tokens_per_minute}. Reduce the prompt or max_tokens.",
            )
        decision = await self.limiter.charge(key, cost)
        request[DECISION] = decision
        if decision.denied is not None:
            self.metrics.child(self.metrics.rate_limited, key.name, decision.denied).inc()
            per_minute = key.requests_per_minute if decision.denied == "requests" else key.tokens_per_minute
            raise GatewayError(
                "rate_limited",
                f"Rate limit of this API key reached: {per_minute} {decision.denied} per minute. "
                f"Retry after {decision.retry_after:.1f} s.",
                retry_after=decision.retry_after,
            )
        self._charged[ex] = (key, cost)

    def finish(self, ex: Exchange) -> None:
        """At the end of every request: its tokens counted per key, and what it was charged settled to its
        real usage (none when it never reached an engine; the prompt and what was generated otherwise)."""
        if ex.completion_tokens is not None:
            m = self.metrics
            m.child(m.key_tokens, ex.key, "prompt").inc(ex.prompt_tokens or 0)
            m.child(m.key_tokens, ex.key, "completion").inc(ex.completion_tokens)
        charged = self._charged.pop(ex, None)
        if charged is None:
            return
        key, cost = charged
        forwarded = ex.phase not in ("received", "queued")
        used = (ex.prompt_tokens or 0) + (ex.completion_tokens or 0) if forwarded else 0
        self.limiter.settle(key, cost, used)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: OpenAI's x-ratelimit-* headers on every answer to a rate-limited key,
        whether the engine's or one the gateway made."""
        decision = request.get(DECISION)
        if decision is not None:
            response.headers.extend(decision.headers())

    def admin_only(self, handler: _Handler) -> _Handler:
        """/metrics and /status: for admin keys only while keys are configured."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            presented = presented_key(request)
            key = self.ring.lookup(presented) if presented else None
            if key is None:
                return _unknown_key().response(request_id(request))
            if not key.admin:
                error = GatewayError("admin_only", f"{request.path} needs an admin API key.")
                return error.response(request_id(request))
            return await handler(request)

        return guarded

    # -- lifecycle ------------------------------------------------------------------------------------

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the keys file reloaded on SIGHUP and on change; the store closed."""
        loop = asyncio.get_running_loop()
        watching = self.watch and bool(self.ring.path)
        if watching:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        watch = asyncio.create_task(self._watch(), name="keys-file-watch") if watching else None
        store = self.limiter.store
        if isinstance(store, RedisStore):
            self.metrics.limits_redis_up.set_function(lambda: store.up)
        yield
        if watch is not None:
            loop.remove_signal_handler(signal.SIGHUP)
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self.limiter.store.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            if self.ring.changed():
                self.reload()
