"""One conformance suite for both control drivers, then what only the Redis driver does.

The conformance tests run against MemoryControl and RedisControl (the private
session redis-server from ``conftest.py``, flushed per test). The
distributed tests use several RedisControl instances on that server, each
standing for one relay process, and break their pub/sub connections with
``CLIENT KILL TYPE pubsub``. Every wait is bounded: a message must reach
every instance's listeners within 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis as redis_sync
from servers import free_port, redis_server

from relay.control import Control, ControlError, ControlMessage, RedisControl, open_control

PREFIX = "fleetgate"
REVOKED_KEY = f"{PREFIX}:relay:revoked"
LIMITS_KEY = f"{PREFIX}:relay:company_limits"
CHANNEL = f"{PREFIX}:relay:control"
DELIVERY_S = 1.0
MakeControl = Callable[[], Awaitable[Control]]


class Inbox:
    """A listener that records every message and lets a test wait for one."""

    def __init__(self) -> None:
        self.messages: list[ControlMessage] = []
        self._arrived = asyncio.Event()

    def __call__(self, message: ControlMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def expect(self, message: ControlMessage, timeout: float = DELIVERY_S) -> None:
        async with asyncio.timeout(timeout):
            while message not in self.messages:
                self._arrived.clear()
                await self._arrived.wait()


async def eventually(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def revoked(jti: str, exp: float) -> ControlMessage:
    return ControlMessage(kind="revoke", data={"jti": jti, "exp": exp})


def limit_changed(company: str, limit: int | None) -> ControlMessage:
    return ControlMessage(kind="company_limit", data={"company": company, "limit": limit})


async def opened_controls(driver: str, url: str) -> AsyncIterator[MakeControl]:
    """Starts controls of one driver on demand; closes them all afterwards."""
    opened: list[Control] = []

    async def make() -> Control:
        control = open_control(driver, url, PREFIX, instance_id=f"relay {len(opened)}")
        opened.append(control)
        await control.start()
        return control

    yield make
    for control in opened:
        await control.close()


@pytest.fixture(params=["memory", "redis"])
async def make_control(request: pytest.FixtureRequest) -> AsyncIterator[MakeControl]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    async for make in opened_controls(request.param, url):
        yield make


@pytest.fixture
async def control(make_control: MakeControl) -> Control:
    return await make_control()


@pytest.fixture
async def make_relay(redis_url: str) -> AsyncIterator[MakeControl]:
    """RedisControl instances on one Redis, each standing for one relay process."""
    async for make in opened_controls("redis", redis_url):
        yield make


# --------------------------------------------------------------------------
# conformance: both drivers


async def test_revoke_is_seen_at_once_and_heard(control: Control) -> None:
    inbox = Inbox()
    control.add_listener(inbox)
    exp = time.time() + 60
    await control.revoke("jti-1", exp)
    assert control.is_revoked("jti-1")
    assert not control.is_revoked("jti-2")
    await inbox.expect(revoked("jti-1", exp))


async def test_expired_revocations_are_not_reported(control: Control) -> None:
    await control.revoke("long-gone", time.time() - 1)
    assert not control.is_revoked("long-gone")
    await control.revoke("short", time.time() + 0.3)
    assert control.is_revoked("short")
    await asyncio.sleep(0.4)
    assert not control.is_revoked("short")


async def test_revoking_again_never_shortens_a_revocation(control: Control) -> None:
    await control.revoke("jti-1", time.time() + 60)
    await control.revoke("jti-1", time.time() + 0.1)
    await asyncio.sleep(0.2)
    assert control.is_revoked("jti-1")


async def test_company_limits_set_override_and_remove(control: Control) -> None:
    inbox = Inbox()
    control.add_listener(inbox)
    assert control.company_limit("acme") is None and control.company_limits() == {}
    await control.set_company_limit("acme", 5)
    await control.set_company_limit("acme", 7)
    await control.set_company_limit("beta", 0)
    assert control.company_limit("acme") == 7
    assert control.company_limits() == {"acme": 7, "beta": 0}
    await control.set_company_limit("acme", None)
    await control.set_company_limit("gamma", None)  # removing what is not there is fine
    assert control.company_limit("acme") is None
    assert control.company_limits() == {"beta": 0}
    control.company_limits()["beta"] = 99  # a copy
    assert control.company_limit("beta") == 0
    await inbox.expect(limit_changed("gamma", None))
    assert inbox.messages == [
        limit_changed("acme", 5),
        limit_changed("acme", 7),
        limit_changed("beta", 0),
        limit_changed("acme", None),
        limit_changed("gamma", None),
    ]
    with pytest.raises(ValueError):
        await control.set_company_limit("acme", -1)


async def test_publish_reaches_listeners(control: Control) -> None:
    first, second = Inbox(), Inbox()
    control.add_listener(first)
    control.add_listener(second)
    hint = ControlMessage(kind="disconnect", data={"user": "u-1", "why": ["link disabled"]})
    await control.publish(hint)
    await control.publish(ControlMessage(kind="link_disabled"))
    await first.expect(ControlMessage(kind="link_disabled"))
    await second.expect(ControlMessage(kind="link_disabled"))
    assert first.messages == second.messages == [hint, ControlMessage(kind="link_disabled")]


async def test_publish_refuses_state_kinds(control: Control) -> None:
    with pytest.raises(ValueError):
        await control.publish(revoked("jti-1", time.time() + 60))
    with pytest.raises(ValueError):
        await control.publish(limit_changed("acme", 3))
    assert not control.is_revoked("jti-1") and control.company_limits() == {}


async def test_a_raising_listener_does_not_stop_later_messages(
    control: Control, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[ControlMessage] = []

    def broken(message: ControlMessage) -> None:
        calls.append(message)
        raise RuntimeError("listener bug")

    inbox = Inbox()
    control.add_listener(broken)
    control.add_listener(inbox)
    with caplog.at_level(logging.ERROR, logger="relay.control"):
        await control.publish(ControlMessage(kind="first"))
        await inbox.expect(ControlMessage(kind="first"))
        exp = time.time() + 60
        await control.revoke("jti-1", exp)
        await inbox.expect(revoked("jti-1", exp))
        await control.publish(ControlMessage(kind="second"))
        await inbox.expect(ControlMessage(kind="second"))
    assert [message.kind for message in calls] == ["first", "revoke", "second"]
    assert [message.kind for message in inbox.messages] == ["first", "revoke", "second"]
    assert sum("listener bug" in (record.exc_text or "") for record in caplog.records) == 3


async def test_closed_control_refuses_writes(make_control: MakeControl) -> None:
    control = await make_control()
    await control.close()
    with pytest.raises(ControlError) as raised:
        await control.revoke("jti-1", time.time() + 60)
    assert raised.value.reason == "control_unavailable"
    with pytest.raises(ControlError):
        await control.set_company_limit("acme", 1)
    with pytest.raises(ControlError):
        await control.publish(ControlMessage(kind="disconnect"))


def test_open_control_refuses_an_unknown_driver() -> None:
    with pytest.raises(ValueError):
        open_control("etcd", "", PREFIX)


# --------------------------------------------------------------------------
# distributed: several RedisControl instances on one Redis


async def test_revoke_reaches_another_instance(make_relay: MakeControl) -> None:
    sender, other = await make_relay(), await make_relay()
    sent, heard = Inbox(), Inbox()
    sender.add_listener(sent)
    other.add_listener(heard)
    exp = time.time() + 60
    await sender.revoke("jti-1", exp)
    await heard.expect(revoked("jti-1", exp))
    assert other.is_revoked("jti-1")
    await asyncio.sleep(0.1)  # a duplicate (the sender's own echo) would show up by now
    assert sent.messages == heard.messages == [revoked("jti-1", exp)]


async def test_an_instance_started_later_loads_revocations_and_limits(make_relay: MakeControl) -> None:
    first = await make_relay()
    await first.revoke("kept", time.time() + 60)
    await first.revoke("expiring", time.time() + 0.2)
    await first.set_company_limit("acme", 5)
    await first.set_company_limit("beta", 8)
    await first.set_company_limit("beta", None)
    await asyncio.sleep(0.3)
    late = await make_relay()
    assert late.is_revoked("kept")
    assert not late.is_revoked("expiring")
    assert late.company_limits() == {"acme": 5}


async def test_company_limits_reach_another_instance(make_relay: MakeControl) -> None:
    sender, other = await make_relay(), await make_relay()
    heard = Inbox()
    other.add_listener(heard)
    await sender.set_company_limit("acme", 5)
    await sender.set_company_limit("acme", 7)
    await heard.expect(limit_changed("acme", 7))
    assert other.company_limit("acme") == 7
    await sender.set_company_limit("acme", None)
    await heard.expect(limit_changed("acme", None))
    assert other.company_limits() == {}


async def test_concurrent_limit_writes_converge_on_the_last_one(make_relay: MakeControl, redis_url: str) -> None:
    relays = [await make_relay() for _ in range(3)]
    for round_ in range(5):
        await asyncio.gather(*(relay.set_company_limit("acme", 10 * round_ + n) for n, relay in enumerate(relays)))
        with redis_sync.Redis.from_url(redis_url) as raw:
            durable = int(raw.hget(LIMITS_KEY, "acme"))
        await eventually(lambda d=durable: all(relay.company_limit("acme") == d for relay in relays), DELIVERY_S)


async def test_publish_reaches_every_instance_once(make_relay: MakeControl) -> None:
    relays = [await make_relay() for _ in range(3)]
    inboxes = [Inbox() for _ in relays]
    for relay, inbox in zip(relays, inboxes, strict=True):
        relay.add_listener(inbox)
    hints = [ControlMessage(kind="disconnect", data={"user": f"u-{n}"}) for n in range(3)]
    for relay, hint in zip(relays, hints, strict=True):
        await relay.publish(hint)
    for inbox in inboxes:
        await inbox.expect(hints[-1])
    await asyncio.sleep(0.1)
    for inbox in inboxes:
        assert inbox.messages == hints


async def test_reconnects_after_pubsub_kill_and_reloads_missed_state(make_relay: MakeControl, redis_url: str) -> None:
    victim, other = await make_relay(), await make_relay()
    inbox = Inbox()
    victim.add_listener(inbox)
    with redis_sync.Redis.from_url(redis_url) as raw:
        for round_ in range(3):
            # No await between the kill and the writes: the victim cannot have
            # resubscribed yet, so only a reload after reconnecting shows them.
            assert int(raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")) >= 2  # others may linger
            raw.zadd(REVOKED_KEY, {f"missed-{round_}": time.time() + 60})
            raw.hset(LIMITS_KEY, "acme", round_)
            for relay in (victim, other):  # both were killed; the next round's kill needs both back
                await eventually(
                    lambda r=round_, c=relay: c.is_revoked(f"missed-{r}") and c.company_limit("acme") == r,
                    DELIVERY_S,
                )
            # The missed revocation also reaches the listeners, so sockets using that token close.
            assert any(m.kind == "revoke" and m.data["jti"] == f"missed-{round_}" for m in inbox.messages)
            hint = ControlMessage(kind="disconnect", data={"round": round_})
            await other.publish(hint)
            await inbox.expect(hint)
            await other.revoke(f"later-{round_}", time.time() + 60)
            await eventually(lambda r=round_: victim.is_revoked(f"later-{r}"), DELIVERY_S)


async def test_a_sender_hears_itself_once_across_a_reconnect(make_relay: MakeControl, redis_url: str) -> None:
    sender = await make_relay()
    inbox = Inbox()
    sender.add_listener(inbox)
    with redis_sync.Redis.from_url(redis_url) as raw:
        raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    exp = time.time() + 60
    await sender.revoke("during", exp)
    assert sender.is_revoked("during")
    await inbox.expect(revoked("during", exp))
    await asyncio.sleep(0.2)
    assert inbox.messages == [revoked("during", exp)]


async def test_foreign_and_malformed_messages(make_relay: MakeControl, redis_url: str) -> None:
    relay = await make_relay()
    inbox = Inbox()
    relay.add_listener(inbox)
    exp = time.time() + 60
    with redis_sync.Redis.from_url(redis_url) as raw:
        raw.publish(CHANNEL, b"\xc1 not msgpack")
        raw.publish(CHANNEL, b'{"kind": "revoke", "data": {"jti": "no-exp"}}')
        raw.publish(CHANNEL, b'{"kind": "company_limit", "data": {"company": "acme", "limit": -3}}')
        # An operator's redis-cli PUBLISH, in JSON, with an integer expiry.
        raw.publish(CHANNEL, b'{"kind": "revoke", "data": {"jti": "by-hand", "exp": %d}}' % int(exp))
        raw.publish(CHANNEL, b'{"kind": "disconnect", "data": {"user": "u-1"}}')
    await inbox.expect(ControlMessage(kind="disconnect", data={"user": "u-1"}))
    assert [message.kind for message in inbox.messages] == ["revoke", "disconnect"]
    assert relay.is_revoked("by-hand") and not relay.is_revoked("no-exp")
    assert relay.company_limits() == {}


async def test_redis_prunes_expired_revocations(make_relay: MakeControl, redis_url: str) -> None:
    relay = await make_relay()
    await relay.revoke("short", time.time() + 0.1)
    await asyncio.sleep(0.2)
    await relay.revoke("long", time.time() + 60)
    with redis_sync.Redis.from_url(redis_url) as raw:
        assert raw.zrange(REVOKED_KEY, 0, -1) == [b"long"]


# --------------------------------------------------------------------------
# distributed: Redis unreachable


async def test_start_and_writes_fail_when_redis_is_unreachable() -> None:
    control = RedisControl(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(ControlError):
            await control.start()
        with pytest.raises(ControlError):
            await control.revoke("jti-1", time.time() + 60)
        with pytest.raises(ControlError):
            await control.set_company_limit("acme", 1)
        with pytest.raises(ControlError):
            await control.publish(ControlMessage(kind="disconnect"))
        assert not control.is_revoked("jti-1") and control.company_limits() == {}
    finally:
        await control.close()


async def test_reconnects_after_a_redis_restart_within_the_backoff_cap(tmp_path: Path) -> None:
    server = redis_server(tmp_path, appendonly=False).start()
    url = f"redis://127.0.0.1:{server.port}/0"
    control, other = RedisControl(url, instance_id="a"), RedisControl(url, instance_id="b")
    try:
        await control.start()
        await other.start()
        server.kill()
        with pytest.raises(ControlError):
            await control.revoke("while-down", time.time() + 60)
        assert not control.is_revoked("while-down")
        await asyncio.sleep(2.0)  # failed attempts: the backoff reaches its 1 s cap
        server = redis_server(tmp_path, appendonly=False, port=server.port).start()
        with redis_sync.Redis.from_url(url) as raw:
            raw.zadd(REVOKED_KEY, {"after-restart": time.time() + 60})
            raw.hset(LIMITS_KEY, "acme", 3)
        # At most one backoff period (1 s) plus a connect and a load.
        await eventually(lambda: control.is_revoked("after-restart") and control.company_limit("acme") == 3, 1.5)
        await eventually(lambda: other.is_revoked("after-restart"), 1.5)
        inbox = Inbox()
        control.add_listener(inbox)
        await other.publish(ControlMessage(kind="disconnect"))
        await inbox.expect(ControlMessage(kind="disconnect"))
    finally:
        await control.close()
        await other.close()
        server.kill()
