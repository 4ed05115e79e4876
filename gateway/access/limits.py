"""Per-key rate limits: requests and tokens per minute as token buckets, in local memory or shared in Redis.

A bucket holds up to its per-minute limit and refills at limit/60 per second.  A request takes 1 request and
its estimated tokens when it is admitted; when it ends, the difference to its real usage is given back (or
taken, when it used more).  With Redis every replica updates the same buckets by one Lua script, under
Redis's clock; while Redis is unreachable each replica falls back to local buckets of limit / replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from gateway.access.keys import Key

log = logging.getLogger("gateway.access")

_REDIS_RETRY = 1.0  # seconds between attempts to reach Redis again while it is down
_REDIS_TIMEOUT = 0.5  # seconds a Redis command may take before the local fallback answers
_PREFIX = "glm-gateway:limits:"

# KEYS[1]: the key's hash {r, t, ts}.  ARGV: requests cap, tokens cap, requests to take, tokens to take,
# check (1: take only when both buckets hold enough; 0: settle, always apply).  Returns both levels and the
# seconds until each bucket could give what was asked.  Numbers go back as strings (Lua floats).
_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local ts = tonumber(state[3]) or now
local ok = 1
local levels, waits = {}, {}
for i = 1, 2 do
  local cap, take = tonumber(ARGV[i]), tonumber(ARGV[i + 2])
  local level = math.min(cap, (tonumber(state[i]) or cap) + (now - ts) * cap / 60)
  levels[i], waits[i] = level, 0
  if cap > 0 and level < take then waits[i] = (take - level) * 60 / cap end
  if ARGV[5] == '1' and waits[i] > 0 then ok = 0 end
end
if ok == 1 then
  for i = 1, 2 do levels[i] = levels[i] - tonumber(ARGV[i + 2]) end
end
redis.call('HSET', KEYS[1], 'r', levels[1], 't', levels[2], 'ts', now)
redis.call('EXPIRE', KEYS[1], 120)
return {ok, tostring(levels[1]), tostring(levels[2]), tostring(waits[1]), tostring(waits[2])}
"""


class Levels(NamedTuple):
    """What one bucket update left: whether it took, each bucket's level, and each one's wait for the ask."""

    ok: bool
    requests: float
    tokens: float
    requests_wait: float
    tokens_wait: float


def apply(state: list[float], caps: tuple[int, int], take: tuple[int, int], check: bool, now: float) -> Levels:
    """The Lua script's arithmetic on local state ``[requests, tokens, ts]`` (ts < 0: a new, full bucket)."""
    (cap_r, cap_t), (take_r, take_t) = caps, take
    if state[2] < 0:
        requests, tokens = float(cap_r), float(cap_t)
    else:
        minutes = (now - state[2]) / 60
        requests, tokens = min(cap_r, state[0] + minutes * cap_r), min(cap_t, state[1] + minutes * cap_t)
    wait_r = (take_r - requests) * 60 / cap_r if cap_r and requests < take_r else 0.0
    wait_t = (take_t - tokens) * 60 / cap_t if cap_t and tokens < take_t else 0.0
    ok = not (check and (wait_r or wait_t))
    if ok:
        requests -= take_r
        tokens -= take_t
    state[0], state[1], state[2] = requests, tokens, now
    return Levels(ok, requests, tokens, wait_r, wait_t)


class Store(Protocol):
    async def update(self, name: str, caps: tuple[int, int], take: tuple[int, int], check: bool) -> Levels: ...

    def settle(self, name: str, caps: tuple[int, int], tokens: int) -> None: ...

    async def close(self) -> None: ...


class LocalStore:
    """Buckets in this process's memory, each limit divided by ``share`` (the replicas that split it)."""

    def __init__(self, share: int = 1) -> None:
        self.share = share
        self._buckets: dict[str, list[float]] = {}

    def caps(self, caps: tuple[int, int]) -> tuple[int, int]:
        return (max(1, caps[0] // self.share) if caps[0] else 0, max(1, caps[1] // self.share) if caps[1] else 0)

    def apply(self, name: str, caps: tuple[int, int], take: tuple[int, int], check: bool) -> Levels:
        state = self._buckets.get(name)
        if state is None:
            state = self._buckets[name] = [0.0, 0.0, -1.0]
        return apply(state, self.caps(caps) if self.share > 1 else caps, take, check, time.monotonic())

    async def update(self, name: str, caps: tuple[int, int], take: tuple[int, int], check: bool) -> Levels:
        return self.apply(name, caps, take, check)

    def settle(self, name: str, caps: tuple[int, int], tokens: int) -> None:
        self.apply(name, caps, (0, tokens), False)

    async def close(self) -> None:
        return None


class RedisStore:
    """Buckets shared by every replica through Redis; local ones of limit / ``replicas`` while it is down."""

    def __init__(self, url: str, replicas: int) -> None:
        import redis.asyncio as aioredis  # the optional extra: glm-gateway[redis]
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError, asyncio.TimeoutError)
        self.redis: Any = aioredis.from_url(
            url, socket_timeout=_REDIS_TIMEOUT, socket_connect_timeout=_REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0)
        )
        self.script = self.redis.register_script(_SCRIPT)
        self.fallback = LocalStore(replicas)
        self.up = True  # the last attempt reached Redis
        self._retry_at = 0.0
        self._settling: set[asyncio.Task[Levels]] = set()

    async def update(self, name: str, caps: tuple[int, int], take: tuple[int, int], check: bool) -> Levels:
        if self.up or time.monotonic() >= self._retry_at:
            try:
                ok, requests, tokens, requests_wait, tokens_wait = await self.script(
                    keys=[_PREFIX + name], args=[*caps, *take, int(check)]
                )
            except self._errors as exc:
                if self.up:
                    log.error("Redis unreachable (%s): local limits of limit / %d apply", exc, self.fallback.share)
                self.up = False
                self._retry_at = time.monotonic() + _REDIS_RETRY
            else:
                if not self.up:
                    log.info("Redis reachable again: the shared limits apply")
                    self.up = True
                return Levels(bool(ok), float(requests), float(tokens), float(requests_wait), float(tokens_wait))
        return self.fallback.apply(name, caps, take, check)

    def settle(self, name: str, caps: tuple[int, int], tokens: int) -> None:
        task = asyncio.ensure_future(self.update(name, caps, (0, tokens), False))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        if self._settling:
            await asyncio.wait(self._settling, timeout=_REDIS_TIMEOUT * 2)
        await self.redis.aclose()


@dataclass(slots=True)
class Decision:
    """A keyed request's rate-limit state, for its x-ratelimit-* headers; ``denied`` names the limit hit."""

    key: Key
    levels: Levels
    denied: str | None = None

    @property
    def retry_after(self) -> float:
        return max(self.levels.requests_wait, self.levels.tokens_wait)

    def headers(self) -> list[tuple[str, str]]:
        """OpenAI's headers: the limit per minute, what is left, and when the bucket is full again."""
        key, levels, out = self.key, self.levels, []
        for kind, cap, level in (
            ("requests", key.requests_per_minute, levels.requests),
            ("tokens", key.tokens_per_minute, levels.tokens),
        ):
            if cap:
                out.append((f"x-ratelimit-limit-{kind}", str(cap)))
                out.append((f"x-ratelimit-remaining-{kind}", str(max(0, int(level)))))
                out.append((f"x-ratelimit-reset-{kind}", duration(max(0.0, cap - level) * 60 / cap)))
        return out


def duration(seconds: float) -> str:
    """OpenAI's format of a reset time: ``6m0s``, ``1.5s``, ``20ms``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


class Limiter:
    """Charges a keyed request at admission and settles it at the end, in one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def caps(key: Key) -> tuple[int, int]:
        return (key.requests_per_minute, key.tokens_per_minute)

    async def charge(self, key: Key, tokens: int) -> Decision:
        levels = await self.store.update(key.name, self.caps(key), (1, tokens), True)
        if levels.ok:
            return Decision(key, levels)
        return Decision(key, levels, "requests" if levels.requests_wait > 0 else "tokens")

    def settle(self, key: Key, charged: int, used: int) -> None:
        """The difference between the tokens taken at admission and those used goes back to the bucket."""
        if key.tokens_per_minute and used != charged:
            self.store.settle(key.name, self.caps(key), used - charged)
