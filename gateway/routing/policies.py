"""The routing policies: least-load by a score, and consistent hashing with bounded loads on a key."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from gateway.routing.load import EngineState

LEAST_LOAD, SESSION = "least-load", "session"
BOUND = 1.25  # a keyed request stays on its engine while that holds < 1.25 x its weighted mean share + 1 requests


def score(state: EngineState, now: float) -> float:
    """least-load's score, higher is better: share x free KV fraction / (1 + requests at the engine)."""
    capacity = state.capacity(now)
    free = 1.0 if not capacity else max(0.0, state.room(now)) / capacity
    return state.share(now) * free / (1 + state.requests(now))


def least_load(states: Sequence[EngineState], now: float) -> list[EngineState]:
    """Best score first; ties go to the fewest of this gateway's requests, then to the upstream list's order."""
    return sorted(states, key=lambda s: (-score(s, now), s.upstream.in_flight))


def _rank(key: bytes, state: EngineState) -> float:
    """Weighted rendezvous hashing: every gateway ranks the engines of a key alike, whatever the list order."""
    digest = hashlib.blake2b(key + b"\0" + state.upstream.url.encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -state.weight / math.log(unit)


def preference(key: bytes, states: Sequence[EngineState]) -> list[EngineState]:
    """The engines in the key's order of preference: the first is its home while it is usable."""
    return sorted(states, key=lambda s: -_rank(key, s))


def bounded(key: bytes, states: Sequence[EngineState], now: float) -> list[EngineState]:
    """``states`` (those with room) in the key's order, engines over their bound moved after the rest: the
    first is where the request goes, the key's first choice while it has room and is within its bound."""
    loads = {s: s.requests(now) for s in states}
    shares = {s: s.share(now) for s in states}
    mean = sum(loads.values()) / (sum(shares.values()) or 1.0)  # requests per unit of weight
    order = preference(key, states)
    within = [s for s in order if loads[s] < BOUND * mean * shares[s] + 1]
    return within + [s for s in order if s not in within]
