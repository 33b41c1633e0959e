"""One conformance suite for both Pusher state drivers: memory (instances sharing one MemoryWorld) and Redis.

Each test builds several instances, each standing for one relay process; the Redis ones use the
private session redis-server (``redis_url``, flushed per test). A dead instance is one closed with
``clean=False``: its heartbeat stops and its share stays behind, as after a crash.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis as redis_sync
from servers import free_port

from relay.pusher_state import (
    MemoryPusherState,
    MemoryWorld,
    PusherState,
    PusherStateError,
    RedisPusherState,
)

MakeState = Callable[..., Awaitable[PusherState]]
APP = "1"
CH = "presence-account.acme"


def member(user: str | int) -> str:
    return json.dumps({"user_id": user, "user_info": {"name": f"User {user}"}})


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeState]:
    """Starts instances of one driver on demand (``make(name, ttl_s=...)``); closes the live ones afterwards."""
    world = MemoryWorld()
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    opened: list[PusherState] = []

    async def make_one(instance: str, ttl_s: float = 15.0) -> PusherState:
        state: PusherState
        if request.param == "redis":
            state = RedisPusherState(url, "conformance", instance, ttl_s=ttl_s)
        else:
            state = MemoryPusherState(instance, ttl_s=ttl_s, world=world)
        await state.start()
        opened.append(state)
        return state

    yield make_one
    for state in opened:
        await state.close()


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


async def test_subscription_counts_sum_over_instances(make: MakeState) -> None:
    a, b = await make("a"), await make("b")
    for state, channel in ((a, "private-account.acme"), (a, "private-account.acme"), (b, "private-account.acme")):
        await state.subscribed(APP, channel, 1)
    await a.subscribed(APP, CH, 1)
    await b.subscribed("2", "private-account.acme", 1)
    assert await b.channels(APP) == {"private-account.acme": 3, CH: 1}
    assert await a.channels(APP, "presence-") == {CH: 1}
    assert await a.channels("2") == {"private-account.acme": 1}
    assert await a.subscription_count(APP, "private-account.acme") == 3
    await a.subscribed(APP, "private-account.acme", -1)
    await a.subscribed(APP, "private-account.acme", -1)
    await a.subscribed(APP, "private-account.acme", -1)  # one too many: never below zero
    assert await b.subscription_count(APP, "private-account.acme") == 1
    await b.subscribed(APP, "private-account.acme", -1)
    assert await a.channels(APP) == {CH: 1}
    assert await a.subscription_count(APP, "nowhere") == 0


async def test_presence_first_and_last_connection_of_a_user_across_instances(make: MakeState) -> None:
    a, b = await make("a"), await make("b")
    assert await a.join(APP, CH, "u1", member("u1")) is True  # first anywhere
    assert await a.join(APP, CH, "u1", member("u1")) is False  # second socket, same instance
    assert await b.join(APP, CH, "u1", member("u1")) is False  # third, on another instance
    assert await b.join(APP, CH, "10", member(10)) is True
    assert await a.members(APP, CH) == {"u1": member("u1"), "10": member(10)}
    assert await a.leave(APP, CH, "u1") is None
    assert await a.leave(APP, CH, "u1") is None  # still on b
    assert await b.members(APP, CH) == {"u1": member("u1"), "10": member(10)}
    assert await b.leave(APP, CH, "u1") == member("u1")  # the last connection anywhere
    assert await b.leave(APP, CH, "u1") is None  # not present: nothing to remove
    assert await b.leave(APP, CH, "10") == member(10)
    assert await a.members(APP, CH) == {}


async def test_apps_and_channels_are_separate(make: MakeState) -> None:
    a = await make("a")
    assert await a.join(APP, CH, "u1", member("u1"))
    assert await a.join("2", CH, "u1", member("u1"))
    assert await a.join(APP, "presence-account.globex", "u1", member("u1"))
    assert await a.leave("2", CH, "u1") == member("u1")
    assert await a.members(APP, CH) == {"u1": member("u1")}
    assert await a.members("2", CH) == {}


async def test_a_dead_instance_leaves_no_ghosts(make: MakeState) -> None:
    a = await make("a", ttl_s=0.6)
    departed: list[tuple[str, str, str]] = []
    a.on_departed(lambda app, channel, m: departed.append((app, channel, m)))
    b = await make("b", ttl_s=0.6)
    await b.subscribed(APP, CH, 1)
    await b.subscribed(APP, CH, 1)
    await a.subscribed(APP, CH, 1)
    assert await b.join(APP, CH, "gone", member("gone"))
    await b.join(APP, CH, "both", member("both"))
    await a.join(APP, CH, "both", member("both"))
    await b.close(clean=False)  # crashed: no more heartbeats, its share stays behind
    assert set(await a.members(APP, CH)) == {"gone", "both"}  # not expired yet

    async def reaped() -> bool:
        return set(await a.members(APP, CH)) == {"both"}

    await eventually(reaped, timeout=2.0)
    assert await a.subscription_count(APP, CH) == 1
    await eventually(lambda: asyncio.sleep(0, bool(departed)), timeout=1.0)
    assert departed == [(APP, CH, member("gone"))]  # "both" is still on a: not departed
    assert await a.join(APP, CH, "gone", member("gone"))  # a new connection is a first one again


async def test_a_clean_close_removes_the_share_at_once(make: MakeState) -> None:
    a, b = await make("a"), await make("b")
    await b.subscribed(APP, CH, 1)
    await b.join(APP, CH, "u1", member("u1"))
    await b.close()
    assert await a.members(APP, CH) == {}
    assert await a.channels(APP) == {}


async def test_redis_share_is_rewritten_after_redis_lost_it(redis_url: str) -> None:
    state = RedisPusherState(redis_url, "conformance", "a", ttl_s=0.3)
    await state.start()
    try:
        await state.subscribed(APP, CH, 1)
        await state.join(APP, CH, "u1", member("u1"))
        client = redis_sync.Redis.from_url(redis_url)
        client.flushall()  # a Redis restart without persistence
        client.close()
        assert await state.members(APP, CH) == {}

        async def restored() -> bool:
            return await state.members(APP, CH) == {"u1": member("u1")}

        await eventually(restored, timeout=2.0)
        assert await state.channels(APP) == {CH: 1}
    finally:
        await state.close()


async def test_redis_unreachable_is_a_pusher_state_error() -> None:
    state = RedisPusherState(f"redis://127.0.0.1:{free_port()}/0", "conformance", "a")
    with pytest.raises(PusherStateError):
        await state.start()
    with pytest.raises(PusherStateError):
        await state.members(APP, CH)
    await state.subscribed(APP, CH, 1)  # counts never raise: repaired by a later heartbeat
    await state.close()
