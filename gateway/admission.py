"""Admission control: a concurrency cap and a token budget, with a bounded FIFO queue and a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass

from gateway.errors import GatewayError

_RATE_WINDOW = 64  # slot releases remembered to measure how fast slots free up


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    cost: int


class Admission:
    """Grants slots in arrival order; a request waits while the slots or the token budget are taken.

    Strict FIFO: a large request at the head of the queue is not overtaken by small ones, so a
    1M-token prompt is not starved by a stream of short chats.
    """

    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout: float, max_tokens: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_tokens = max_tokens  # 0 = no token budget
        self.in_flight = 0
        self.tokens_in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        self._releases: deque[float] = deque(maxlen=_RATE_WINDOW)

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def _fits(self, cost: int) -> bool:
        if self.in_flight >= self.max_concurrency:
            return False
        return not self.max_tokens or self.tokens_in_flight + cost <= self.max_tokens

    def _take(self, cost: int) -> None:
        self.in_flight += 1
        self.tokens_in_flight += cost

    def retry_after(self) -> float:
        """Seconds until a new request would likely get a slot: backlog over the measured release rate."""
        backlog = len(self._waiters) + 1
        if len(self._releases) >= 2:
            span = time.monotonic() - self._releases[0]
            if span > 0:
                return backlog / (len(self._releases) / span)
        # nothing measured yet: every slot is held by a request that has not finished
        return self.queue_timeout

    async def acquire(self, cost: int) -> float:
        """Wait for a slot; returns the seconds waited.  Raises GatewayError when refused."""
        if self.max_tokens and cost > self.max_tokens:
            raise GatewayError(
                "tokens_budget",
                f"This request needs about {cost} tokens (prompt + max_tokens), more than the gateway's "
                f"whole budget of {self.max_tokens} tokens in flight. Reduce the prompt or max_tokens.",
            )
        if not self._waiters and self._fits(cost):
            self._take(cost)
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise GatewayError(
                "queue_full",
                f"The gateway's queue is full ({self.max_queue} requests waiting). Retry later.",
                retry_after=self.retry_after(),
            )
        start = time.monotonic()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give_back(cost)  # granted at the moment we gave up: hand the slot on
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

    def release(self, cost: int) -> None:
        """A forwarded request finished: its slot and tokens go to the next waiters."""
        self._releases.append(time.monotonic())  # measures the rate behind Retry-After
        self._give_back(cost)

    def _give_back(self, cost: int) -> None:
        self.in_flight -= 1
        self.tokens_in_flight -= cost
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            head = waiters[0]
            if head.future.done():  # cancelled; its task has not run its clean-up yet
                waiters.popleft()
                continue
            if not self._fits(head.cost):
                return
            waiters.popleft()
            self._take(head.cost)
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
        }
