"""The native protocol at /ws with real websockets clients: every message, error and close code."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from relaykit import Client, driver, office, position, running_system, token
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.tokens import mint_token

pytestmark = pytest.mark.asyncio


async def test_auth_answers_authenticated(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await Client.connect(system.ws_url)
        before = time.time()
        reply = await client.auth("office", "acme", "u1", ttl_s=600)
        assert reply["type"] == "authenticated"
        assert (reply["user_id"], reply["role"], reply["company_id"]) == ("u1", "office", "acme")
        expires = reply["expires_at"]
        assert expires.endswith("Z")
        from datetime import datetime

        assert abs(datetime.fromisoformat(expires).timestamp() - (before + 600)) < 5
        await client.close()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"action": "auth", "user_id": "u1", "role": "office", "token": "not-a-jwt"}, 4001),
        ({"action": "auth", "user_id": "u2", "role": "office", "token": token("office", "acme", "u1")}, 4001),
        ({"action": "auth", "user_id": "u1", "role": "driver", "token": token("office", "acme", "u1")}, 4001),
        (
            {
                "action": "auth",
                "user_id": "u1",
                "role": "office",
                "token": token("office", "acme", "u1", 10, now=time.time() - 100),
            },
            4002,
        ),
        ({"action": "subscribe", "all": True}, 4001),
    ],
    ids=["bad-token", "user-mismatch", "role-mismatch", "expired", "action-before-auth"],
)
async def test_unauthorized_closes(tmp_path: Any, message: dict[str, Any], code: int) -> None:
    async with running_system(tmp_path) as system:
        client = await Client.connect(system.ws_url)
        await client.send(message)
        reply = await client.recv()
        assert reply["type"] == "error" and reply["error"] == "Unauthorized", reply
        assert await client.closed_with() == code


async def test_token_signed_with_another_secret_is_refused(tmp_path: Any) -> None:
    from relay.settings import AuthSettings

    forged = mint_token(
        AuthSettings(secret="another-secret-of-at-least-32-bytes!"), role="office", company="acme", user="u1", ttl_s=60
    )
    async with running_system(tmp_path) as system:
        client = await Client.connect(system.ws_url)
        await client.send({"action": "auth", "user_id": "u1", "role": "office", "token": forged})
        assert (await client.recv())["error"] == "Unauthorized"
        assert await client.closed_with() == 4001


async def test_no_auth_within_timeout_closes(tmp_path: Any) -> None:
    async with running_system(tmp_path, auth_timeout_s=0.3) as system:
        client = await Client.connect(system.ws_url)
        started = time.monotonic()
        reply = await client.recv(2.0)
        assert reply["error"] == "Unauthorized"
        assert await client.closed_with() == 4001
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ("{not json", "BadPayload"),
        ('{"no_action": 1}', "BadPayload"),
        ('{"action": "teleport"}', "InvalidAction"),
        ('{"action": "subscribe", "all": "yes"}', "BadPayload"),
        ('{"action": "subscribe"}', "BadPayload"),
        ('{"action": "subscribe", "all": true, "extra": 1}', "BadPayload"),
        ('{"action": "auth", "user_id": "office-1", "role": "office", "token": "x"}', "InvalidAction"),
    ],
)
async def test_bad_messages_answer_an_error_and_keep_the_socket(tmp_path: Any, payload: str, error: str) -> None:
    async with running_system(tmp_path) as system:
        client = await office(system.ws_url, "acme")
        await client.send(payload)
        reply = await client.recv()
        assert (reply["type"], reply["error"]) == ("error", error), reply
        assert reply["message"]
        await client.send({"action": "ping"})
        assert await client.recv() == {"type": "pong"}


async def test_binary_frame_is_bad_payload(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await office(system.ws_url, "acme")
        await client.send(b"\x00\x01")
        assert (await client.recv())["error"] == "BadPayload"


async def test_ping_before_and_after_auth(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await Client.connect(system.ws_url)
        await client.send({"action": "ping"})
        assert await client.recv() == {"type": "pong"}
        await client.auth("driver", "acme", "d1")
        await client.send({"action": "ping"})
        assert await client.recv() == {"type": "pong"}


async def test_driver_location_reaches_office_through_the_pipeline(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "all": True})
        assert await watcher.recv() == {"type": "subscribed", "all": True}
        phone = await driver(system.ws_url, "acme", "d7", name="Dana")
        await phone.send({"action": "location", "lat": 52.52, "lng": 13.405, "speed": 36.0, "bearing": 90})
        accepted = await phone.recv()
        assert accepted["type"] == "accepted"
        loc = await watcher.recv_type("location")
        assert loc["driver_id"] == "d7"
        assert (loc["lat"], loc["lng"], loc["speed"], loc["bearing"]) == (52.52, 13.405, 36.0, 90)
        assert loc["display_name"] == "Dana"
        assert loc["moving"] is True  # enriched by the gateway pipeline (36 km/h > start threshold)
        assert loc["source"] == "driver"
        assert loc["timestamp"] == accepted["timestamp"]
        assert "imei" not in loc


async def test_driver_timestamp_is_kept(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "driver_id": "d7"})
        await watcher.recv_type("subscribed")
        phone = await driver(system.ws_url, "acme", "d7")
        await phone.send({"action": "location", "lat": 1.0, "lng": 2.0, "timestamp": "2026-11-30T10:00:00+01:00"})
        assert (await phone.recv())["timestamp"] == "2026-11-30T09:00:00Z"
        loc = await watcher.recv_type("location")
        assert loc["timestamp"] == "2026-11-30T09:00:00Z"
        await asyncio.sleep(1.0)
        await phone.send({"action": "location", "lat": 1.0, "lng": 2.0, "timestamp": "yesterday"})
        assert (await phone.recv())["error"] == "BadPayload"


@pytest.mark.parametrize(
    "fields",
    [
        {"lat": 91.0, "lng": 0.0},
        {"lat": 0.0, "lng": -181.0},
        {"lat": 0.0, "lng": 0.0, "speed": -1},
        {"lat": "x", "lng": 0},
    ],
)
async def test_driver_location_out_of_range_is_bad_payload(tmp_path: Any, fields: dict[str, Any]) -> None:
    async with running_system(tmp_path) as system:
        phone = await driver(system.ws_url, "acme", "d1")
        await phone.send({"action": "location", **fields})
        assert (await phone.recv())["error"] == "BadPayload"


async def test_driver_rate_limit(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "all": True})
        await watcher.recv_type("subscribed")
        phone = await driver(system.ws_url, "acme", "d1")
        await phone.send({"action": "location", "lat": 1.0, "lng": 1.0})
        assert (await phone.recv())["type"] == "accepted"
        await phone.send({"action": "location", "lat": 2.0, "lng": 2.0})
        limited = await phone.recv()
        assert (limited["type"], limited["error"]) == ("error", "RateLimited")
        first = await watcher.recv_type("location")
        assert first["lat"] == 1.0
        assert await watcher.nothing_within(0.5)  # the refused update was not published
        await asyncio.sleep(1.0)
        await phone.send({"action": "location", "lat": 3.0, "lng": 3.0})
        assert (await phone.recv())["type"] == "accepted"
        assert (await watcher.recv_type("location"))["lat"] == 3.0


async def test_roles_are_enforced(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        phone = await driver(system.ws_url, "acme", "d1")
        await phone.send({"action": "subscribe", "all": True})
        assert (await phone.recv())["error"] == "Forbidden"
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "location", "lat": 1.0, "lng": 1.0})
        assert (await watcher.recv())["error"] == "Forbidden"
        await watcher.send({"action": "ping"})  # both stay open
        await phone.send({"action": "ping"})
        assert await watcher.recv() == {"type": "pong"} and await phone.recv() == {"type": "pong"}


async def test_subscribe_one_driver_gets_last_position_then_only_that_driver(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        await system.publish([position("d7", "acme", lat=10.0), position("d8", "acme", lat=20.0)])
        await asyncio.sleep(0.1)
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "driver_id": "d7"})
        assert await watcher.recv() == {"type": "subscribed", "driver_id": "d7"}
        last = await watcher.recv()
        assert (last["type"], last["driver_id"], last["lat"]) == ("location", "d7", 10.0)
        await system.publish([position("d8", "acme", lat=21.0), position("d7", "acme", lat=11.0, t=time.time() + 1)])
        live = await watcher.recv()
        assert (live["driver_id"], live["lat"]) == ("d7", 11.0)
        assert await watcher.nothing_within(0.3)


async def test_subscribe_all_gets_every_last_position_of_the_company_only(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        await system.publish([position("a1", "acme"), position("a2", "acme"), position("b1", "globex")])
        await asyncio.sleep(0.1)
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "all": True})
        assert await watcher.recv() == {"type": "subscribed", "all": True}
        seen = {(await watcher.recv())["driver_id"] for _ in range(2)}
        assert seen == {"a1", "a2"}
        assert await watcher.nothing_within(0.3)


async def test_cross_company_subscription_is_forbidden_and_socket_stays(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        await system.publish([position("b1", "globex")])
        await asyncio.sleep(0.1)
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "driver_id": "b1"})
        assert (await watcher.recv())["error"] == "Forbidden"
        await system.publish([position("b1", "globex", t=time.time() + 1)])
        await watcher.send({"action": "ping"})
        assert await watcher.recv() == {"type": "pong"}
        assert await watcher.nothing_within(0.3)


async def test_unsubscribe_stops_updates(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "all": True})
        await watcher.recv_type("subscribed")
        await system.publish([position("a1", "acme")])
        await watcher.recv_type("location")
        await watcher.send({"action": "unsubscribe", "all": True})
        assert await watcher.recv() == {"type": "unsubscribed", "all": True}
        await system.publish([position("a1", "acme", t=time.time() + 1)])
        assert await watcher.nothing_within(0.3)
        await watcher.send({"action": "subscribe", "driver_id": "a1"})
        await watcher.recv_type("subscribed")
        await watcher.recv_type("location")  # last position
        await watcher.send({"action": "unsubscribe", "driver_id": "a1"})
        assert await watcher.recv() == {"type": "unsubscribed", "driver_id": "a1"}
        await system.publish([position("a1", "acme", t=time.time() + 2)])
        assert await watcher.nothing_within(0.3)


async def test_all_and_one_driver_deliver_once(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme")
        for message in ({"action": "subscribe", "all": True}, {"action": "subscribe", "driver_id": "a1"}):
            await watcher.send(message)
            await watcher.recv_type("subscribed")
        await system.publish([position("a1", "acme")])
        assert (await watcher.recv_type("location"))["driver_id"] == "a1"
        assert await watcher.nothing_within(0.3)


async def test_token_assets_restrict_what_an_office_sees(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme", assets=["a1"])
        await watcher.send({"action": "subscribe", "driver_id": "a2"})
        assert (await watcher.recv())["error"] == "Forbidden"
        await watcher.send({"action": "subscribe", "all": True})
        await watcher.recv_type("subscribed")
        await system.publish([position("a2", "acme"), position("a1", "acme")])
        assert (await watcher.recv_type("location"))["driver_id"] == "a1"
        assert await watcher.nothing_within(0.3)


async def test_token_expiry_closes_within_a_second(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await Client.connect(system.ws_url)
        reply = await client.auth("office", "acme", "u1", ttl_s=2)
        from datetime import datetime

        exp = datetime.fromisoformat(reply["expires_at"]).timestamp()
        error = await client.recv(4.0)
        assert (error["error"], error["message"]) == ("Unauthorized", "token expired")
        assert await client.closed_with() == 4002
        assert exp - 0.05 <= time.time() <= exp + 1.0


async def test_revocation_closes_within_a_second(tmp_path: Any) -> None:
    import jwt

    async with running_system(tmp_path) as system:
        raw = token("office", "acme", "u1")
        jti = jwt.decode(raw, options={"verify_signature": False})["jti"]
        client = await Client.connect(system.ws_url)
        await client.send({"action": "auth", "user_id": "u1", "role": "office", "token": raw})
        await client.recv_type("authenticated")
        bystander = await office(system.ws_url, "acme", "u2")
        started = time.monotonic()
        await system.control.revoke(jti, time.time() + 3600)
        error = await client.recv()
        assert (error["error"], error["message"]) == ("Unauthorized", "token revoked")
        assert await client.closed_with() == 4001
        assert time.monotonic() - started < 1.0
        # A revoked token cannot authenticate again; other tokens are untouched.
        again = await Client.connect(system.ws_url)
        await again.send({"action": "auth", "user_id": "u1", "role": "office", "token": raw})
        assert (await again.recv())["error"] == "Unauthorized"
        await bystander.send({"action": "ping"})
        assert await bystander.recv() == {"type": "pong"}


async def test_company_connection_cap(tmp_path: Any) -> None:
    async with running_system(tmp_path, max_connections_per_company=2, company_limits={"globex": 1}) as system:
        first = await office(system.ws_url, "acme", "u1")
        await driver(system.ws_url, "acme", "d1")
        third = await Client.connect(system.ws_url)
        reply = await third.auth("office", "acme", "u3")
        assert (reply["type"], reply["error"]) == ("error", "LimitReached")
        assert await third.closed_with() == 4004
        await office(system.ws_url, "globex")  # another company has its own cap
        over = await Client.connect(system.ws_url)
        assert (await over.auth("office", "globex", "g2"))["error"] == "LimitReached"
        await first.close()  # a closed socket frees its place
        await asyncio.sleep(0.1)
        await office(system.ws_url, "acme", "u4")
        await system.control.set_company_limit("acme", 3)  # admin override
        await office(system.ws_url, "acme", "u5")


async def test_message_over_16_kib_closes_with_1009(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await office(system.ws_url, "acme")
        await client.send(json.dumps({"action": "ping", "pad": "x" * 17000}))
        assert await client.closed_with() == 1009


async def test_message_just_under_the_limit_is_read(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await office(system.ws_url, "acme")
        message = json.dumps({"action": "ping", "pad": "x" * 16000})
        assert len(message) < 16 * 1024
        await client.send(message)
        assert (await client.recv())["error"] == "BadPayload"  # unknown field, but read and answered


async def test_unknown_path_is_refused(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        with pytest.raises(InvalidStatus) as info:
            await connect(system.ws_url.replace("/ws", "/nope"), open_timeout=3)
        assert info.value.response.status_code == 404


async def test_server_pings_and_closes_a_frozen_client(tmp_path: Any) -> None:
    async with running_system(tmp_path, ping_interval_s=0.2, ping_timeout_s=0.3) as system:
        # A live client answers pings (websockets does it) and stays.
        alive = await office(system.ws_url, "acme", "u1")
        # A frozen client: handshake done, then never reads or answers.
        reader, writer = await asyncio.open_connection("127.0.0.1", system.relay.ws_port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head
        ping = await asyncio.wait_for(reader.readexactly(2), 2.0)
        assert ping[0] == 0x89  # FIN + ping opcode
        rest = b""
        with pytest.raises(asyncio.IncompleteReadError):
            async with asyncio.timeout(3.0):
                while True:
                    rest += await reader.readexactly(1)
        assert b"ping timeout" in rest  # the close frame's reason, then the connection dropped
        await asyncio.sleep(0.5)
        await alive.send({"action": "ping"})
        assert await alive.recv() == {"type": "pong"}
        writer.close()


async def test_closed_sockets_leave_their_channels(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        watcher = await office(system.ws_url, "acme")
        await watcher.send({"action": "subscribe", "all": True})
        await watcher.recv_type("subscribed")
        assert system.relay.hub is not None and system.relay.hub.channels
        await watcher.close()
        await asyncio.sleep(0.1)
        assert not system.relay.hub.channels
        assert system.relay.native is not None and not system.relay.native.company_connections


async def test_server_close_code_on_shutdown(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        url = system.ws_url
        watcher = await office(url, "acme")
        stop = asyncio.create_task(system.relay.stop(1.0))
        try:
            assert await watcher.closed_with() == 1001
        finally:
            await stop
        with pytest.raises((OSError, ConnectionClosed)):
            await connect(url, open_timeout=1)


async def test_fragmented_message_is_reassembled(tmp_path: Any) -> None:
    async with running_system(tmp_path) as system:
        client = await office(system.ws_url, "acme")
        await client.ws.send(iter(['{"action":', ' "ping"}']))  # two frames: text + continuation
        assert await client.recv() == {"type": "pong"}
        await client.ws.send(iter(['{"action": "ping", "pad": "', "x" * 9000, "y" * 9000, '"}']))
        assert await client.closed_with() == 1009  # the limit holds over the whole message
