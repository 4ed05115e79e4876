"""The engines once per host with ``--workers N``: the parent's gateway that checks them, resolves their names,
reads their load and keeps their breakers; one engine's state on the wire; and a worker's copy of a breaker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web

from gateway.app import Gateway
from gateway.routing.breaker import Breaker
from gateway.routing.load import EngineLoad, EngineState
from gateway.settings import Settings, UpstreamSpec
from gateway.upstreams import Upstream


def view(upstream: Upstream, state: EngineState) -> dict[str, Any]:
    """One engine as the parent's checks, load reads and breaker left it, for the wire (the clock is the host's
    monotonic one, the same in every process)."""
    b = state.breaker
    return {
        "url": upstream.url, "name": upstream.name, "weight": upstream.weight, "up": upstream.up,
        "fails": upstream.fails, "successes": upstream.successes,
        "last_error": upstream.last_error, "last_check": upstream.last_check, "models": upstream.models,
        "cards": upstream.cards, "was_up": state.was_up, "loaded_at": state.loaded_at,
        "load": dataclasses.astuple(state.load) if state.load is not None else None,
        "breaker": [b.fails, b.opened_at, b.probe_at, b.recovered_at],
    }  # fmt: skip


def apply_view(upstream: Upstream, state: EngineState, view: dict[str, Any]) -> bool:
    """A worker takes the parent's view of one engine; True when the models it serves changed."""
    upstream.up, upstream.fails, upstream.successes = view["up"], view["fails"], view["successes"]
    upstream.last_error, upstream.last_check, upstream.cards = view["last_error"], view["last_check"], view["cards"]
    state.was_up, state.loaded_at = view["was_up"], view["loaded_at"]
    state.load = EngineLoad(*view["load"]) if view["load"] is not None else None
    b = state.breaker
    b.fails, b.opened_at, b.probe_at, b.recovered_at = view["breaker"]
    changed = view["models"] != upstream.models
    upstream.models = view["models"]
    return changed


class EngineHost(Gateway):
    """The parent's own gateway, which serves no request: it checks the engines, resolves their names, reads their
    load, keeps their breakers, collects the GPU and host series, and holds the one ``Admission`` of all workers."""

    def __init__(self, settings: Settings, changed: Callable[[], None]) -> None:
        super().__init__(settings)
        self.changed = changed  # the engines' state changed: the workers are sent it
        self.rounds = 0  # rounds of health checks done
        self.checked = asyncio.Event()
        self.health.after = self._checked
        self.router.after = changed

    def _checked(self) -> None:
        self.rounds += 1
        self.checked.set()
        self.changed()

    def set_engines(self, specs: Sequence[UpstreamSpec]) -> None:
        """DNS discovery's engines, found here once for the host, and sent to every worker."""
        super().set_engines(specs)
        self.changed()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Checks and load reads for as long as the context lasts; entered after the first round of checks (or
        its time-out), so that the first workers start knowing the engines."""
        async with contextlib.asynccontextmanager(self.lifecycle)(web.Application()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * self.settings.health_timeout + 1):
                    await self.checked.wait()
            yield

    def state(self) -> dict[str, Any]:
        """What every worker applies: the engines (DNS discovery's, in order), each one's state, and the GPU
        faults that make the gateway not ready."""
        engines = [view(u, self.router.states[u]) for u in self.pool.upstreams]
        return {"op": "engines", "engines": engines, "gpu_faults": self.health.gpu_faults}

    def observed(self, msg: dict[str, Any]) -> None:
        """A worker's request met an engine: a failure (a refused connection also marks it down), a success
        after failures, or the half-open breaker's probe going."""
        upstream = next((u for u in self.pool.upstreams if u.url == msg["url"]), None)
        state = self.router.states.get(upstream) if upstream is not None else None
        if upstream is None or state is None:  # it left the pool meanwhile
            return
        if msg["event"] == "failure":
            if msg["down"]:
                self.pool.mark_down(upstream, msg["reason"])
            state.breaker.failure(msg["reason"])
        elif msg["event"] == "success":
            state.breaker.success()
        else:
            state.breaker.claim(time.monotonic())
        self.changed()


class SharedBreaker(Breaker):
    """A worker's copy of the parent's breaker of one engine: the worker's outcomes go to the parent, which
    decides; the state here is the parent's as of its last message.  A success closes it here at once (as it
    will there) and a probe claimed here counts here at once; a failure counts once the parent answers."""

    __slots__ = ("observed", "upstream")

    def __init__(self, upstream: Upstream, observed: Callable[..., None], failures: int, cooldown: float) -> None:
        """``observed(upstream, event, reason="", down=False)``: what a request met, told the parent."""
        super().__init__(upstream.name, failures, cooldown)
        self.upstream = upstream
        self.observed = observed

    def success(self) -> None:
        if not self.fails and self.opened_at is None:
            return  # nothing to reset: nothing to tell
        self.observed(self.upstream, "success")
        if self.opened_at is not None:
            self.recovered_at = time.monotonic()
        self.fails = 0
        self.opened_at = self.probe_at = None

    def failure(self, reason: str) -> None:
        upstream = self.upstream  # a refused connection marked it down here just now, with this reason
        self.observed(upstream, "failure", reason, down=not upstream.up and upstream.last_error == reason)

    def claim(self, now: float) -> None:
        if self.opened_at is not None:
            self.probe_at = now
            self.observed(self.upstream, "claim")
