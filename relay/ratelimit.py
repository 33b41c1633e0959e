"""Rate limits for the public endpoints: one interface, a memory driver and a Redis driver.

A limiter answers one question, :meth:`RateLimiter.hit`: may one more request with this key pass,
given at most ``limit`` requests per ``window_s`` seconds? ``None`` means yes (and the request is
counted); a number means no, and is the number of seconds until one would pass (the HTTP
``Retry-After``). Both drivers keep a sliding log, not a fixed window: at most ``limit`` requests
are ever allowed in *any* interval of ``window_s`` seconds (a fixed window lets ``2 * limit``
through around its boundary). A refused request is not counted, so a client hammering a limit
is let through again as soon as its oldest counted request leaves the window.

* :class:`MemoryRateLimiter`: one process (embedded mode); a deque of at most ``limit``
  timestamps per key, swept of idle keys once per ``sweep_interval_s``.
* :class:`RedisRateLimiter`: every relay instance shares the counts (distributed mode); a sorted
  set per key (``{prefix}:rl:{key}``), pruned, counted and added to in one Lua script on Redis'
  own clock (``TIME``), so instances with skewed clocks agree; the key expires with its window.

Exceptions::

    RateLimited           a request over its limit (``retry_after_s``); REST answers 429 + Retry-After
    RateLimiterError      the Redis driver could not reach Redis; REST answers 503

The same conformance tests (``tests/test_ratelimit.py``) run against both drivers.
"""

from __future__ import annotations

import collections
import itertools
import math
import secrets
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = [
    "MemoryRateLimiter",
    "RateLimited",
    "RateLimiter",
    "RateLimiterError",
    "RedisRateLimiter",
    "enforce",
    "open_rate_limiter",
]


class RateLimited(Exception):
    """A request over its limit; ``retry_after_s`` until one would pass."""

    reason = "rate_limited"

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limited; retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up (RFC 9110 ``Retry-After`` takes no fractions), at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiterError(Exception):
    """The limiter's backend (Redis) failed; the request cannot be judged."""

    reason = "rate_limiter_unavailable"


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        """Count one request for ``key`` if fewer than ``limit`` were counted in the last ``window_s``
        seconds and return None; otherwise count nothing and return the seconds until one would pass."""
        ...

    async def close(self) -> None: ...


async def enforce(limiter: RateLimiter, key: str, limit: int, window_s: float) -> None:
    """:meth:`RateLimiter.hit`, raising :class:`RateLimited` when refused."""
    retry_after = await limiter.hit(key, limit, window_s)
    if retry_after is not None:
        raise RateLimited(retry_after)


def _check(limit: int, window_s: float) -> None:
    if limit < 1 or not window_s > 0 or not math.isfinite(window_s):
        raise ValueError(f"a rate limit needs limit >= 1 and a finite window > 0, not {limit} per {window_s} s")


class MemoryRateLimiter:
    """:class:`RateLimiter` in this process. ``clock`` is monotonic seconds (injectable for tests)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, sweep_interval_s: float = 60.0) -> None:
        self._clock = clock
        self._sweep_interval_s = sweep_interval_s
        self._next_sweep = clock() + sweep_interval_s
        # key -> (window of its last hit, counted hit times oldest first; never more than the limit)
        self._hits: dict[str, tuple[float, collections.deque[float]]] = {}

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        _check(limit, window_s)
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._hits.get(key)
        times = entry[1] if entry is not None else collections.deque()
        cutoff = now - window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if len(times) >= limit:
            # Refused until enough of the counted hits leave the window to make room for one more.
            return times[len(times) - limit] + window_s - now
        times.append(now)
        self._hits[key] = (window_s, times)
        return None

    def _sweep(self, now: float) -> None:
        """Drop keys whose newest hit has left its window: memory stays proportional to recent clients."""
        self._next_sweep = now + self._sweep_interval_s
        idle = [key for key, (window, times) in self._hits.items() if not times or times[-1] <= now - window]
        for key in idle:
            del self._hits[key]

    def __len__(self) -> int:
        """How many keys are tracked (for tests of the sweep)."""
        return len(self._hits)

    async def close(self) -> None:
        self._hits.clear()


# KEYS[1]: the key; ARGV: limit, window (µs), a unique member suffix. Returns -1 when counted, else
# the µs until one more would pass. Time is Redis' own (TIME), the same for every instance.
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
    redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[3])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
    return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return tonumber(oldest[2]) + window - now
"""


class RedisRateLimiter:
    """:class:`RateLimiter` on the Redis at ``url``, keys ``{prefix}:rl:{key}`` (Redis 5 or later: ``TIME``
    in a script). ``timeout_s`` bounds connecting and each reply."""

    def __init__(self, url: str, prefix: str = "fleetgate", *, timeout_s: float = 2.0) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_HIT)
        self._prefix = f"{prefix}:rl:"
        # Two hits in one microsecond on one key must be two members: an instance tag and a counter.
        self._tag = secrets.token_hex(4)
        self._counter = itertools.count()

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        _check(limit, window_s)
        member = f"{self._tag}:{next(self._counter)}"
        try:
            wait_us = int(
                await self._script(keys=[self._prefix + key], args=[limit, math.ceil(window_s * 1e6), member])
            )
        except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError too
            raise RateLimiterError(f"redis: {type(exc).__name__}: {exc}") from exc
        return None if wait_us < 0 else wait_us / 1e6

    async def close(self) -> None:
        await self._redis.aclose()


def open_rate_limiter(driver: str, redis_url: str = "", prefix: str = "fleetgate") -> RateLimiter:
    """The driver ``driver`` names: ``memory`` (one process) or ``redis`` (shared by every relay)."""
    if driver == "redis":
        return RedisRateLimiter(redis_url, prefix)
    if driver == "memory":
        return MemoryRateLimiter()
    raise ValueError(f"unknown rate limiter driver {driver!r} (memory, redis)")
