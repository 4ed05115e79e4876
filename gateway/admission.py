"""Admission control: a concurrency cap and a token budget, with a bounded FIFO queue (a fair one across keys,
see fair.py) and a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque

from gateway.errors import GatewayError
from gateway.fair import FairQueue, Tenant, Waiter

RATE_WINDOW = 64  # slot releases remembered to measure how fast slots free up


class Admission:
    """Grants slots in arrival order; a request waits while the slots or the token budget are taken.

    Strict FIFO: a large request at the head of the queue is not overtaken by small ones, so a
    1M-token prompt is not starved by a stream of short chats.  With ``fair`` (API keys configured) the
    queue is a FairQueue: FIFO within a key, a weighted fair share across keys, per-key concurrency caps.
    """

    def __init__(
        self, max_concurrency: int, max_queue: int, queue_timeout: float, max_tokens: int, *, fair: bool = False
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_tokens = max_tokens  # 0 = no token budget
        self.in_flight = 0
        self.tokens_in_flight = 0
        self.granted = 0  # slots ever granted: how far a waiter has moved up (see position)
        self.fair = FairQueue() if fair else None
        self._waiters: deque[Waiter] | FairQueue = self.fair if self.fair is not None else deque()
        self._releases: deque[float] = deque(maxlen=RATE_WINDOW)

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def _fits(self, cost: int) -> bool:
        if self.in_flight >= self.max_concurrency:
            return False
        return not self.max_tokens or self.tokens_in_flight + cost <= self.max_tokens

    def _take(self, cost: int, tenant: Tenant | None) -> None:
        self.granted += 1
        self.in_flight += 1
        self.tokens_in_flight += cost
        if tenant is not None:
            tenant.in_flight += 1
            tenant.tokens_in_flight += cost

    def retry_after(self) -> float:
        """Seconds until a new request would likely get a slot: backlog over the measured release rate."""
        return self.eta(len(self._waiters) + 1)

    def position(self, ahead: int, granted: int) -> int:
        """The queue position now of a request that had ``ahead`` waiters before it when ``granted`` slots
        had been granted: exact in FIFO order, an upper bound when waiters ahead of it gave up."""
        return max(1, ahead + 1 - (self.granted - granted))

    def eta(self, backlog: int) -> float:
        """Seconds until ``backlog`` more slots free up, at the measured release rate."""
        if len(self._releases) >= 2:
            span = time.monotonic() - self._releases[0]
            if span > 0:
                return backlog / (len(self._releases) / span)
        # nothing measured yet: every slot is held by a request that has not finished
        return self.queue_timeout

    def try_acquire(self, cost: int, key: str = "") -> bool:
        """A slot at once, as ``acquire`` grants it when no one waits and it fits (the key under its cap); False
        when the request would have to wait or be refused (``acquire`` says which)."""
        tenant = self.fair.tenant(key) if self.fair is not None else None
        if self._waiters or not self._fits(cost) or (tenant is not None and tenant.capped):
            return False
        self._take(cost, tenant)
        return True

    async def acquire(self, cost: int, key: str = "", waited: float = 0.0) -> float:
        """Wait for a slot; returns the seconds waited.  Raises GatewayError when refused.  ``key`` (the API
        key's name) counts only with a fair queue; ``waited``, seconds the request already waited before it
        came here (for spare slots called back), counts in the timeout and the seconds returned."""
        if self.max_tokens and cost > self.max_tokens:
            raise GatewayError(
                "tokens_budget",
                f"This request needs about {cost} tokens (prompt + max_tokens), more than the gateway's "
                f"whole budget of {self.max_tokens} tokens in flight. Reduce the prompt or max_tokens.",
            )
        if self.try_acquire(cost, key):
            return waited
        tenant = self.fair.tenant(key) if self.fair is not None else None
        if len(self._waiters) >= self.max_queue:
            raise GatewayError(
                "queue_full",
                f"The gateway's queue is full ({self.max_queue} requests waiting). Retry later.",
                retry_after=self.retry_after(),
            )
        start = time.monotonic() - waited
        waiter = Waiter(asyncio.get_running_loop().create_future(), cost, tenant)
        self._waiters.append(waiter)
        if tenant is not None:
            self._wake()  # other keys' waiters may be held by their own caps only: this one may go now
        try:
            async with asyncio.timeout(self.queue_timeout - waited):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self.give_back(1, cost, key)  # granted at the moment we gave up: hand the slot on
            else:
                # _wake may have dropped it already: cancelling the task cancels the future at once,
                # and a release can run before this task does
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._wake()  # a large request leaving the head may let smaller ones in
            if isinstance(exc, TimeoutError):
                raise GatewayError(
                    "queue_timeout",
                    f"No capacity freed up within {self.queue_timeout:g} s. Retry later.",
                    retry_after=self.retry_after(),
                ) from None
            raise
        return time.monotonic() - start

    def release(self, cost: int, key: str = "") -> None:
        """A forwarded request finished: its slot and tokens go to the next waiters."""
        self._releases.append(time.monotonic())  # measures the rate behind Retry-After
        self.give_back(1, cost, key)

    def heard(self, releases: list[float]) -> None:
        """Releases made elsewhere (time.monotonic(), the host's one clock): a worker's of its spare slots, which
        this admission did not see.  The rate behind Retry-After counts them with its own."""
        if releases:  # (a call-back answered by a worker that kept nothing spare sends none)
            self._releases = deque(sorted([*self._releases, *releases])[-RATE_WINDOW:], maxlen=RATE_WINDOW)

    def give_back(self, slots: int, tokens: int, key: str = "") -> None:
        """Slots and their tokens no longer held (a request's, a worker's spare ones, a dead worker's): to the next
        waiters."""
        self.in_flight -= slots
        self.tokens_in_flight -= tokens
        if self.fair is not None:
            tenant = self.fair.tenant(key)
            tenant.in_flight -= slots
            tenant.tokens_in_flight -= tokens
        self._wake()

    def _wake(self) -> None:
        if self.fair is not None:
            while (chosen := self.fair.next(self._fits)) is not None:
                self._take(chosen.cost, chosen.tenant)
                chosen.future.set_result(None)
            return
        waiters = self._waiters
        assert isinstance(waiters, deque)
        while waiters:
            head = waiters[0]
            if head.future.done():  # cancelled; its task has not run its clean-up yet
                waiters.popleft()
                continue
            if not self._fits(head.cost):
                return
            waiters.popleft()
            self._take(head.cost, None)
            head.future.set_result(None)

    def stats(self) -> dict[str, int | float]:
        return {
            "in_flight": self.in_flight,
            "max_concurrency": self.max_concurrency,
            "queue_depth": len(self._waiters),
            "max_queue": self.max_queue,
            "tokens_in_flight": self.tokens_in_flight,
            "max_tokens_in_flight": self.max_tokens,
            "retry_after_s": math.ceil(self.retry_after()),
            **({"keys": self.tenant_stats()} if self.fair is not None else {}),
        }

    def tenant_stats(self) -> dict[str, dict[str, int]]:
        assert self.fair is not None
        return {
            t.name: {"in_flight": t.in_flight, "queue_depth": len(t.waiters), "tokens_in_flight": t.tokens_in_flight}
            for t in self.fair.tenants.values()
        }
