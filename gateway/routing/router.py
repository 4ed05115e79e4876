"""Routing of one request: the engines it may go to, in order, once one has KV room for it; the waiting for
room in arrival order; the breakers' and the retry budget's book-keeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy

from gateway.errors import GatewayError
from gateway.metrics.engine import EngineCollector
from gateway.metrics.gateway import GatewayMetrics
from gateway.protocol import Generation
from gateway.routing.breaker import STATE_VALUES, Breaker
from gateway.routing.load import EngineState
from gateway.routing.policies import LEAST_LOAD, SESSION, bounded, least_load, preference
from gateway.routing.retries import RetryBudget
from gateway.settings import Settings
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("gateway.routing")
# a refused connection; a 503 (busy) before any byte; the connection dropped before the answer's head
RETRY_REASONS = ("unreachable", "unavailable", "reset")

AFFINITY, FALLBACK, LEAST, RETRY = "affinity", "fallback", "least_load", "retry"


class Route:
    """One request's engines in the order to try, and the engine that holds its tokens now."""

    __slots__ = ("at", "candidates", "cost", "held", "tries")

    def __init__(self, candidates: list[EngineState], cost: int) -> None:
        self.candidates = [s.upstream for s in candidates]
        self.cost = cost
        self.held: EngineState | None = None
        self.tries = 0
        self.at = 0  # the candidate being tried

    def hold(self, state: EngineState, now: float) -> None:
        if self.held is not None:
            self.held.tokens -= self.cost
        state.tokens += self.cost
        state.breaker.claim(now)
        self.held = state


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[Route]
    cost: int
    model: str
    states: list[EngineState]
    key: bytes | None


class Router:
    """Orders the engines for each request by the policy, among those with KV room; holds a request until
    one has room; keeps each engine's breaker and the pool's retry budget."""

    def __init__(
        self,
        settings: Settings,
        pool: UpstreamPool,
        engines: EngineCollector,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.engines = engines  # the scrape of each engine's /metrics, shared with the gateway's /metrics page
        # a view is stale after three missed reads: a round of reads waits for the slowest engine (up to the
        # timeout) and a read may serve the cache, up to its age
        every = max(settings.engine_load_interval, settings.engine_metrics_max_age)
        self.stale = 3 * (every + settings.engine_metrics_timeout)
        self.states: dict[Upstream, EngineState] = {}  # the pool's engines, and those leaving it (see follow)
        self._leaving: list[Upstream] = []
        self.budget = RetryBudget(settings.retry_budget)
        self._waiters: deque[_Waiter] = deque()
        self.after: Callable[[], None] | None = None  # after each load round (the parent of --workers sends it on)
        self.held: Callable[[EngineState], None] | None = None  # an engine's tokens in flight changed (a worker
        # of --workers tells its parent)
        self.follow(pool.upstreams, (), joined=False)

    def follow(self, added: Iterable[Upstream], removed: Iterable[Upstream], *, joined: bool = True) -> None:
        """The pool changed (``UpstreamPool.reconcile``): an added engine gets its state, breaker and series
        (``joined``: its first good check starts a slow start, as for an engine that came back); a removed one
        gets no new request, and its state and series stay until nothing is in flight to it (dropped at the next
        release of a request or read of the engines' load).  Requests waiting for KV room look again, among the
        engines now serving their model."""
        m, cfg = self.metrics, self.settings
        sources = {source.url: source for source in self.engines.sources}
        for upstream in added:
            breaker = Breaker(upstream.name, cfg.breaker_failures, cfg.breaker_cooldown)
            state = EngineState(
                upstream, sources.get(upstream.url), breaker, weight=upstream.weight, headroom=cfg.kv_headroom,
                slow_start=cfg.slow_start, stale_after=self.stale,
            )  # fmt: skip
            if joined:
                state.was_up = False
            self.states[upstream] = state
            name = upstream.name
            m.breaker_state.labels(name).set_function(lambda s=state: STATE_VALUES[s.breaker.state()])
            m.kv_free.labels(name).set_function(lambda s=state: _finite(s.room(time.monotonic())))
            for reason in RETRY_REASONS:  # created at 0, so rate() sees a first retry
                m.child(m.retries, name, reason)
        self._leaving.extend(removed)
        self._drop_idle()
        for upstream in self.pool.upstreams:
            self.states[upstream].weight = upstream.weight
        for waiter in self._waiters:
            try:
                waiter.states = self._serving(waiter.model)
            except GatewayError:  # no engine serves its model any more: the connection step says so
                waiter.states = []
        self._wake()

    def _drop_idle(self) -> None:
        """Engines that left the pool and have nothing in flight any more: their state and series go (unless an
        engine of the same name joined since)."""
        idle = [u for u in self._leaving if not u.in_flight and not self.states[u].tokens]
        if not idle:
            return
        names = {u.name for u in self.pool.upstreams}
        for upstream in idle:
            self._leaving.remove(upstream)
            del self.states[upstream]
            if upstream.name not in names:
                self.metrics.forget(upstream.name)

    def leaving(self) -> list[dict[str, object]]:
        """The engines removed from the pool whose requests are still running (/status)."""
        return [{"name": u.name, "in_flight": u.in_flight} for u in self._leaving]

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # -- the load view ------------------------------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Refresh every engine's load from its /metrics (the fetch that serves the gateway's /metrics) every
        --engine-load-interval seconds."""
        while True:
            try:
                await self.engines.refresh(session)
                self.refreshed()
                if self.after is not None:
                    self.after()
            except Exception:  # a bug here must not freeze every engine's load for good
                log.exception("engine load refresh failed")
            await asyncio.sleep(self.settings.engine_load_interval)

    def refreshed(self) -> None:
        """The engines' views are new (read here, or sent by the parent of --workers): each engine's load is
        read again; room freed since lets waiting requests in."""
        now = time.monotonic()
        for state in self.states.values():
            state.update(now)
        self._drop_idle()
        self._wake()

    def key(self, headers: CIMultiDictProxy[str], gen: Generation | None) -> bytes | None:
        """The key a request is hashed by: its session (--session-header, else ``user``) or its prefix."""
        policy = self.settings.routing
        if policy == LEAST_LOAD or gen is None:
            return None
        if policy == SESSION:
            header = headers.get(self.settings.session_header)
            return header.encode("utf-8", "surrogateescape") if header else gen.session
        return gen.prefix

    # -- choosing ---------------------------------------------------------------------------------------

    def _serving(self, model: str) -> list[EngineState]:
        """The engines serving ``model``, in the pool's order (the policy orders them); GatewayError 404 when
        none does."""
        states = self.states
        return [states[u] for u in self.pool.serving(model)]

    def plain(self, model: str) -> Route:
        """A request outside admission (model lists, tokenize): usable engines by score, then the others."""
        now = time.monotonic()
        states = self._serving(model)
        usable = [s for s in states if s.usable(now)]
        return Route([*least_load(usable, now), *least_load([s for s in states if s not in usable], now)], 0)

    async def admit(self, cost: int, model: str, key: bytes | None, timeout: float) -> Route:  # noqa: ASYNC109
        """The request's route once an engine has KV room for ``cost`` tokens; waits for room behind the
        requests that came before it.  Raises GatewayError when no engine can hold it any more, or on timeout."""
        self.budget.request()
        states = self._serving(model)
        now = time.monotonic()
        self._refuse_oversized(cost, states, now)
        if not self._waiters:
            route = self._choose(cost, states, key, now)
            if route is not None:
                return route
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost, model, states, key)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled():
                self.release(future.result())  # granted as we gave up: the room goes to the next
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise GatewayError(
                    "queue_timeout",
                    f"No engine had KV cache room for this request's {cost} tokens within {timeout:g} s. Retry later.",
                    retry_after=1,
                ) from None
            raise

    def check(self, cost: int, model: str) -> None:
        """Refuse (400 ``kv_capacity``) a request larger than every engine's KV cache x --kv-headroom, when every
        engine reports its KV cache: it could never be admitted."""
        self._refuse_oversized(cost, self._serving(model), time.monotonic())

    def _refuse_oversized(self, cost: int, states: Sequence[EngineState], now: float) -> None:
        capacities = [s.capacity(now) for s in states]
        if capacities and all(capacities) and cost > max(capacities):
            raise GatewayError(
                "kv_capacity",
                f"This request needs about {cost} tokens (prompt + max_tokens), more than any engine's KV cache "
                f"holds ({max(capacities)} tokens with the headroom). Reduce the prompt or max_tokens.",
            )

    def _choose(self, cost: int, states: list[EngineState], key: bytes | None, now: float) -> Route | None:
        """The route over the engines with room, or None while every usable engine is full.  With no usable
        engine at all, every engine is tried: the connection errors then say why."""
        if not states:
            return Route([], cost)  # no engine serves it: the connection step says so
        usable = [s for s in states if s.usable(now)]
        fits = [s for s in usable if s.room(now) >= cost]
        if usable and not fits:
            return None
        # last resorts, down or open: those with room, or all of them when none is usable
        rest = [s for s in states if s not in usable and (not usable or s.room(now) >= cost)]
        policy = self.settings.routing
        if key is None or policy == LEAST_LOAD:
            order, reason = least_load(fits, now), LEAST
        else:
            order = bounded(key, fits, now)
            home = preference(key, states)[0]
            reason = AFFINITY if order and order[0] is home else FALLBACK
            if reason == FALLBACK:
                self.metrics.affinity_moves.inc()
        ordered = [*order, *least_load(rest, now)]
        route = Route(ordered, cost)
        route.hold(ordered[0], now)
        self._held(ordered[0])
        self._decided(ordered[0].upstream, reason)
        return route

    def _held(self, state: EngineState) -> None:
        if self.held is not None:
            self.held(state)

    def _decided(self, upstream: Upstream, reason: str) -> None:
        m = self.metrics
        m.child(m.routing_decisions, upstream.name, self.settings.routing, reason).inc()

    def _wake(self) -> None:
        waiters = self._waiters
        now = time.monotonic()
        while waiters:
            head = waiters[0]
            if head.future.done():  # cancelled; its task has not cleaned up yet
                waiters.popleft()
                continue
            route = self._choose(head.cost, head.states, head.key, now)
            if route is None:
                return
            waiters.popleft()
            head.future.set_result(route)

    # -- what happened ----------------------------------------------------------------------------------

    def retry(self, route: Route, left: Upstream, reason: str, *, ready: bool = False) -> Upstream | None:
        """The engine the request moves to from ``left`` (nothing was sent, or the engine refused it as busy):
        the route's next engine still in the pool (one that left it since the route was made is passed over),
        and up when ``ready``; within --retries and the retry budget.  None when there is none or it may not
        move.  Counted in gateway_retries_total."""
        candidates = route.candidates
        at = next((j for j in range(route.at + 1, len(candidates)) if self._in_pool(candidates[j])), None)
        if at is None or (ready and not candidates[at].up):
            return None
        if route.tries >= self.settings.retries or not self.budget.allow():
            return None
        route.tries += 1
        route.at = at
        to = candidates[at]
        if left in self.states:  # not an engine that left the pool and is gone already (its series are)
            self.metrics.child(self.metrics.retries, left.name, reason).inc()
        state = self.states.get(to)
        if route.held is not None and state is not None:  # an admitted request: its tokens and decision move along
            was = route.held
            route.hold(state, time.monotonic())
            self._held(was)
            self._held(state)
            self._decided(to, RETRY)
        return to

    def _in_pool(self, upstream: Upstream) -> bool:
        """Not removed from the pool, nor leaving it (removed, its requests still running)."""
        return upstream in self.states and upstream not in self._leaving

    def answered(self, upstream: Upstream, status: int) -> None:
        """The engine's answer's head: a 5xx other than 503 (busy, its own queue full) counts as a failure."""
        state = self.states.get(upstream)
        if state is None:  # it left the pool while the request ran
            return
        if status >= 500 and status != 503:
            state.breaker.failure(f"HTTP {status}")
        else:
            state.breaker.success()

    def failed(self, upstream: Upstream, reason: str) -> None:
        """No answer from the engine: refused, reset or timed out before its head."""
        state = self.states.get(upstream)
        if state is not None:
            state.breaker.failure(reason)

    def release(self, route: Route) -> None:
        """The request finished: its tokens leave the engine that held them; waiting requests may fit now."""
        if route.held is not None:
            route.held.tokens -= route.cost
            self._held(route.held)
            route.held = None
            if self._leaving:
                self._drop_idle()
            if self._waiters:
                self._wake()

    def public(self, upstream: Upstream) -> dict[str, object]:
        return self.states[upstream].public(time.monotonic())


def _finite(room: float) -> float:
    return room if not math.isinf(room) else math.nan
