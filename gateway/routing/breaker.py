"""A circuit breaker per engine: consecutive failures open it, a probe after the cool-down closes it."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("gateway.routing")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # gateway_upstream_breaker_state


class Breaker:
    """``failures`` failures in a row open it; after ``cooldown`` seconds it is half-open: one request (the
    probe) may go; the probe's success closes it, its failure opens it again.  A probe that never reports
    (its client left) frees the way for another after one more cool-down."""

    __slots__ = ("cooldown", "fails", "failures", "name", "opened_at", "probe_at", "recovered_at")

    def __init__(self, name: str, failures: int, cooldown: float) -> None:
        self.name = name
        self.failures = failures  # 0 = never opens
        self.cooldown = cooldown
        self.fails = 0
        self.opened_at: float | None = None
        self.probe_at: float | None = None
        self.recovered_at: float | None = None  # when it last closed after being open: the slow start's start

    def state(self, now: float | None = None) -> str:
        if self.opened_at is None:
            return CLOSED
        now = time.monotonic() if now is None else now
        return HALF_OPEN if now - self.opened_at >= self.cooldown else OPEN

    def available(self, now: float) -> bool:
        """Whether a request may go now, without claiming the probe."""
        if self.opened_at is None:
            return True
        if now - self.opened_at < self.cooldown:
            return False
        return self.probe_at is None or now - self.probe_at >= self.cooldown

    def claim(self, now: float) -> None:
        """A request goes: while half-open it is the probe."""
        if self.opened_at is not None:
            self.probe_at = now

    def success(self) -> None:
        self.fails = 0
        if self.opened_at is not None:
            log.info("upstream %s: breaker closed after a good answer", self.name)
            self.opened_at = self.probe_at = None
            self.recovered_at = time.monotonic()

    def failure(self, reason: str) -> None:
        self.fails += 1
        now = time.monotonic()
        if self.opened_at is not None:
            if self.probe_at is not None:  # the probe failed: another cool-down
                self.opened_at, self.probe_at = now, None
            return
        if self.failures and self.fails >= self.failures:
            log.warning("upstream %s: breaker open after %d failures in a row: %s", self.name, self.fails, reason)
            self.opened_at = now
