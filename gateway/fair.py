"""The fair share of the admission queue across keys: FIFO within a key, and the next free capacity to the
key furthest below its weighted share of the tokens in flight."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Tenant:
    """One key's place in the queue: its waiters in arrival order and what it has in flight."""

    name: str
    weight: float = 1.0
    max_concurrency: int = 0  # 0: only the gateway's cap
    in_flight: int = 0
    tokens_in_flight: int = 0
    waiters: deque[Waiter] = field(default_factory=deque)

    @property
    def capped(self) -> bool:
        return bool(self.max_concurrency) and self.in_flight >= self.max_concurrency

    def share(self) -> tuple[float, float]:
        """How much of the capacity it holds for its weight: tokens first, then requests (for cost-0 ones)."""
        return (self.tokens_in_flight / self.weight, self.in_flight / self.weight)


@dataclass(slots=True)
class Waiter:
    future: asyncio.Future[None]
    cost: int
    tenant: Tenant | None = None
    seq: int = 0


class FairQueue:
    """Waiters grouped by key.  ``next`` picks the head of the key with the smallest share of what is in
    flight (ties to the one waiting longest); a key at its own max_concurrency is passed over, so it waits
    without holding up the others.  A chosen head that does not fit the gateway's capacity stops the round:
    a large request is not overtaken by other keys' small ones."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = {}
        self._seq = itertools.count()
        self._depth = 0

    def __len__(self) -> int:
        return self._depth

    def tenant(self, name: str) -> Tenant:
        found = self.tenants.get(name)
        if found is None:
            found = self.tenants[name] = Tenant(name)
        return found

    def configure(self, name: str, weight: float, max_concurrency: int) -> None:
        """A key's weight and cap, from the keys file (again after a reload)."""
        tenant = self.tenant(name)
        tenant.weight, tenant.max_concurrency = weight, max_concurrency

    def append(self, waiter: Waiter) -> None:
        assert waiter.tenant is not None
        waiter.seq = next(self._seq)
        waiter.tenant.waiters.append(waiter)
        self._depth += 1

    def remove(self, waiter: Waiter) -> None:
        """Raises ValueError when it is no longer queued (as ``deque.remove``)."""
        assert waiter.tenant is not None
        waiter.tenant.waiters.remove(waiter)
        self._depth -= 1

    def next(self, fits: Callable[[int], bool]) -> Waiter | None:
        """Take the waiter that should get the capacity now, or None when it must wait."""
        best: Tenant | None = None
        for tenant in self.tenants.values():
            waiters = tenant.waiters
            while waiters and waiters[0].future.done():  # cancelled; its task has not run its clean-up yet
                waiters.popleft()
                self._depth -= 1
            if not waiters or tenant.capped:
                continue
            if best is None or (tenant.share(), waiters[0].seq) < (best.share(), best.waiters[0].seq):
                best = tenant
        if best is None or not fits(best.waiters[0].cost):
            return None
        self._depth -= 1
        return best.waiters.popleft()
