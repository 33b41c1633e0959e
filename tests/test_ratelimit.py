"""The rate limiter contract, run against both drivers: memory (this process) and Redis (private server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis as redis_sync
from servers import free_port

from relay.ratelimit import (
    MemoryRateLimiter,
    RateLimited,
    RateLimiter,
    RateLimiterError,
    RedisRateLimiter,
    enforce,
    open_rate_limiter,
)

OpenLimiter = Callable[[], RateLimiter]


@pytest.fixture(params=["memory", "redis"])
async def open_limiter(request: pytest.FixtureRequest) -> AsyncIterator[OpenLimiter]:
    """Opens limiters sharing one state: the same Redis, or (memory) the same instance."""
    opened: list[RateLimiter] = []
    shared = MemoryRateLimiter()

    def open_one() -> RateLimiter:
        if request.param == "memory":
            return shared
        opened.append(open_rate_limiter("redis", request.getfixturevalue("redis_url"), "rltest"))
        return opened[-1]

    yield open_one
    for limiter in opened:
        await limiter.close()
    await shared.close()


@pytest.fixture
def limiter(open_limiter: OpenLimiter) -> RateLimiter:
    return open_limiter()


async def test_allows_up_to_the_limit_then_refuses_with_the_wait(limiter: RateLimiter) -> None:
    assert [await limiter.hit("ip:1", 3, 60) for _ in range(3)] == [None, None, None]
    wait = await limiter.hit("ip:1", 3, 60)
    assert wait is not None and 59 < wait <= 60


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    assert await limiter.hit("a", 1, 60) is None
    assert await limiter.hit("a", 1, 60) is not None
    assert await limiter.hit("b", 1, 60) is None


async def test_the_window_slides_and_refused_hits_are_not_counted(limiter: RateLimiter) -> None:
    assert await limiter.hit("k", 2, 0.4) is None
    await asyncio.sleep(0.2)
    assert await limiter.hit("k", 2, 0.4) is None
    for _ in range(5):  # hammering while refused does not push the next pass back
        wait = await limiter.hit("k", 2, 0.4)
        assert wait is not None and 0 < wait <= 0.21
    await asyncio.sleep(wait + 0.02)
    assert await limiter.hit("k", 2, 0.4) is None  # the first hit left the window: room for one
    assert await limiter.hit("k", 2, 0.4) is not None  # the second is still in it


async def test_never_more_than_the_limit_in_any_window(limiter: RateLimiter) -> None:
    # A fixed window anchored at the first hit would start afresh at 0.5 s and let both late hits through.
    assert await limiter.hit("slide", 2, 0.5) is None  # t = 0
    await asyncio.sleep(0.3)
    assert await limiter.hit("slide", 2, 0.5) is None  # t = 0.3
    await asyncio.sleep(0.25)
    assert await limiter.hit("slide", 2, 0.5) is None  # t = 0.55: the first hit has left the window
    assert await limiter.hit("slide", 2, 0.5) is not None  # the hits of 0.3 and 0.55 are still in it


async def test_instances_share_the_counts(open_limiter: OpenLimiter) -> None:
    first, second = open_limiter(), open_limiter()
    assert await first.hit("shared", 2, 60) is None
    assert await second.hit("shared", 2, 60) is None
    assert await first.hit("shared", 2, 60) is not None
    assert await second.hit("shared", 2, 60) is not None


async def test_concurrent_hits_never_pass_the_limit(limiter: RateLimiter) -> None:
    results = await asyncio.gather(*(limiter.hit("crowd", 10, 60) for _ in range(50)))
    assert sum(r is None for r in results) == 10


async def test_enforce_raises_rate_limited(limiter: RateLimiter) -> None:
    await enforce(limiter, "e", 1, 60)
    with pytest.raises(RateLimited) as caught:
        await enforce(limiter, "e", 1, 60)
    assert 59 < caught.value.retry_after_s <= 60
    assert caught.value.retry_after_header == "60"


@pytest.mark.parametrize(("limit", "window"), [(0, 60), (-1, 60), (1, 0), (1, -5), (1, float("inf"))])
async def test_nonsense_limits_are_refused(limiter: RateLimiter, limit: int, window: float) -> None:
    with pytest.raises(ValueError):
        await limiter.hit("x", limit, window)


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert RateLimited(0.001).retry_after_header == "1"
    assert RateLimited(1.0).retry_after_header == "1"
    assert RateLimited(1.2).retry_after_header == "2"
    assert RateLimited(59.9).retry_after_header == "60"


# -- driver specifics -------------------------------------------------------------------------------


async def test_memory_sweep_forgets_idle_keys() -> None:
    now = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0], sweep_interval_s=10)
    for i in range(100):
        await limiter.hit(f"ip:{i}", 5, 60)
    assert len(limiter) == 100
    now[0] = 30.0
    await limiter.hit("late", 5, 60)  # a sweep is due, but every key is still in its window
    assert len(limiter) == 101
    now[0] = 75.0
    await limiter.hit("later", 5, 60)
    assert len(limiter) == 2  # "late" (hit at 30) and "later"


async def test_redis_keys_live_under_the_prefix_and_expire_with_the_window(redis_url: str) -> None:
    limiter = RedisRateLimiter(redis_url, "tenant")
    try:
        await limiter.hit("verify:10.0.0.1", 5, 30)
    finally:
        await limiter.close()
    with redis_sync.Redis.from_url(redis_url) as raw:
        assert raw.keys("*") == [b"tenant:rl:verify:10.0.0.1"]
        assert 29_000 < raw.pttl("tenant:rl:verify:10.0.0.1") <= 30_000


async def test_redis_unreachable_is_a_rate_limiter_error() -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        with pytest.raises(RateLimiterError):
            await limiter.hit("k", 1, 60)
    finally:
        await limiter.close()


def test_open_rate_limiter_refuses_an_unknown_driver() -> None:
    with pytest.raises(ValueError, match="unknown rate limiter driver"):
        open_rate_limiter("memcached")
