"""The retry budget: moves to another engine stay under a share of the requests of a recent window."""

from __future__ import annotations

import time
from collections import deque

WINDOW = 10.0  # seconds of requests and retries the budget looks at
MIN_RETRIES = 3  # always allowed per window, so a quiet gateway still retries its first failures


class RetryBudget:
    """Allows a retry while retries in the window stay within ``ratio`` x requests (at least MIN_RETRIES):
    when every engine fails, requests fail fast instead of multiplying the load on a failing pool."""

    def __init__(self, ratio: float, window: float = WINDOW) -> None:
        self.ratio = ratio
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for seen in (self._requests, self._retries):
            while seen and seen[0] < edge:
                seen.popleft()

    def request(self) -> None:
        now = time.monotonic()
        self._trim(now)
        self._requests.append(now)

    def allow(self) -> bool:
        """Whether one more retry fits; if it does, it is counted."""
        now = time.monotonic()
        self._trim(now)
        if len(self._retries) + 1 > max(MIN_RETRIES, self.ratio * len(self._requests)):
            return False
        self._retries.append(now)
        return True
