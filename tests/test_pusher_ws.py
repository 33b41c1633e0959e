"""The Pusher protocol at /app/{key} with real websockets clients speaking Pusher JSON (pusher.md §1-§3).

Signatures are made here with ``relay.pusher_auth.channel_auth``, as ``/broadcasting/auth`` would.
Records go onto the bus (``system.publish``) and reach sockets through the feed, the hub and the
location batching, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from gatewaykit import running_gateway
from relaykit import AUTH, JsonSocket, System, position, relay_settings, running_system
from websockets.asyncio.client import ClientConnection, connect

from gateway.bus.memory import MemoryBus
from gateway.settings import BusSettings
from relay.control import RedisControl
from relay.pusher import PusherHub
from relay.pusher_auth import channel_auth
from relay.pusher_state import RedisPusherState
from relay.service import Relay
from relay.settings import PusherAppSettings, PusherSettings

APP = PusherAppSettings(id="1", key="app-key", secret="app-secret", name="dashboards")
CHAT = PusherAppSettings(id="2", key="chat-key", secret="chat-secret", enable_client_messages=True)
CAPPED = PusherAppSettings(id="3", key="capped-key", secret="capped-secret", max_connections=2)
PUSHER = PusherSettings(apps=[APP, CHAT, CAPPED])
QUERY = "protocol=7&client=js&version=8.6.0&flash=false"
SOCKET_ID = re.compile(r"^\d+\.\d+$")


class PusherClient(JsonSocket):
    """A Pusher client on a raw websockets connection: JSON messages as pusher-js sends them."""

    def __init__(self, ws: ClientConnection, app: PusherAppSettings) -> None:
        super().__init__(ws)
        self.app = app
        self.socket_id = ""

    @classmethod
    async def open(cls, port: int, app: PusherAppSettings = APP, query: str = QUERY) -> PusherClient:
        """Connected, without reading ``connection_established``."""
        return cls(await connect(f"ws://127.0.0.1:{port}/app/{app.key}?{query}", open_timeout=5), app)

    @classmethod
    async def connect(cls, port: int, app: PusherAppSettings = APP, query: str = QUERY) -> PusherClient:
        client = await cls.open(port, app, query)
        established = await client.recv()
        assert established["event"] == "pusher:connection_established", established
        client.socket_id = json.loads(established["data"])["socket_id"]
        return client

    async def send(self, event: str, data: Any = None, channel: str | None = None) -> None:
        message: dict[str, Any] = {"event": event, "data": {} if data is None else data}
        if channel is not None:
            message["channel"] = channel
        await self.ws.send(json.dumps(message))

    async def recv_event(self, event: str, timeout: float = 3.0) -> dict[str, Any]:
        """The next message named ``event``, skipping others."""
        return await self.next_where("event", event, timeout)

    def sign(self, channel: str, channel_data: str | None = None) -> str:
        return channel_auth(self.app.key, self.app.secret, self.socket_id, channel, channel_data)

    async def subscribe(self, channel: str, *, user: Any = None, auth: str | None = None) -> dict[str, Any]:
        """Subscribe (signed unless public, or with ``auth``); the reply."""
        data: dict[str, Any] = {"channel": channel}
        channel_data = None
        if user is not None:
            channel_data = json.dumps({"user_id": user, "user_info": {"name": f"User {user}"}})
            data["channel_data"] = channel_data
        if auth is not None:
            data["auth"] = auth
        elif channel.startswith(("private-", "presence-")):
            data["auth"] = self.sign(channel, channel_data)
        await self.send("pusher:subscribe", data)
        return await self.recv()

    async def subscribed(self, channel: str, **kwargs: Any) -> dict[str, Any]:
        reply = await self.subscribe(channel, **kwargs)
        assert reply["event"] == "pusher_internal:subscription_succeeded", reply
        assert reply["channel"] == channel
        return reply

    async def ping(self) -> None:
        await self.send("pusher:ping")
        assert await self.recv() == {"event": "pusher:pong", "data": {}}

    def drop(self) -> None:
        """Vanish without a closing handshake (a phone losing its network)."""
        self.ws.transport.abort()


@contextlib.asynccontextmanager
async def pusher_system(tmp_path: Any, **relay: Any) -> AsyncIterator[tuple[System, PusherHub, int]]:
    async with running_system(tmp_path, pusher=relay.pop("pusher", PUSHER), **relay) as system:
        assert system.relay.pusher is not None
        yield system, system.relay.pusher, system.relay.ws_port


async def refused_with(port: int, key: str, query: str) -> tuple[dict[str, Any], int | None]:
    client = await PusherClient.open(port, PusherAppSettings(key=key), query)
    error = await client.recv()
    return error, await client.closed_with()


# --- connection ---------------------------------------------------------------------------------------


async def test_connection_established_is_double_encoded(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.open(port)
        raw = await client.ws.recv()
        message = json.loads(raw)
        assert set(message) == {"event", "data"} and message["event"] == "pusher:connection_established"
        assert isinstance(message["data"], str)  # pysher json.loads() it (pusher.md §1.2)
        data = json.loads(message["data"])
        assert SOCKET_ID.match(data["socket_id"]) and data["activity_timeout"] == 30
        other = await PusherClient.connect(port)
        assert other.socket_id != data["socket_id"]


@pytest.mark.parametrize("protocol", [5, 6, 7])
async def test_protocols_5_to_7_are_accepted(tmp_path: Any, protocol: int) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port, query=f"protocol={protocol}&client=Pysher&version=1.0.7")
        await client.ping()


@pytest.mark.parametrize(
    ("key", "query", "code"),
    [
        ("nope", QUERY, 4001),
        ("app-key", "protocol=4&client=js", 4007),
        ("app-key", "protocol=seven", 4007),
        ("app-key", "client=js&version=8.6.0", 4008),
    ],
    ids=["unknown-key", "protocol-4", "protocol-not-a-number", "no-protocol"],
)
async def test_refused_connections_get_an_error_then_the_same_close_code(
    tmp_path: Any, key: str, query: str, code: int
) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        error, closed = await refused_with(port, key, query)
        assert error["event"] == "pusher:error"
        assert error["data"]["code"] == code and error["data"]["message"]  # an object (§1.5)
        assert closed == code


async def test_ping_pong_in_both_client_styles(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port)
        await client.ping()
        await client.ws.send('{"event":"pusher:ping","data":""}')  # pysher
        assert await client.recv() == {"event": "pusher:pong", "data": {}}
        await client.send("pusher:pong")  # an answer to a server ping: no reply
        assert await client.nothing_within(0.2)


async def test_unanswered_pings_close_with_4201(tmp_path: Any) -> None:
    pusher = msgspec.structs.replace(PUSHER, pong_timeout_s=0.3)  # the Pusher side's own pong timeout
    async with pusher_system(tmp_path, pusher=pusher, ping_interval_s=0.2, ping_timeout_s=30.0) as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /app/app-key?{QUERY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
        async with asyncio.timeout(3.0):  # frames (unmasked, short): read until the close frame
            while True:
                head = await reader.readexactly(2)
                payload = await reader.readexactly(head[1] & 0x7F)
                if head[0] == 0x88:
                    break
        assert int.from_bytes(payload[:2], "big") == 4201
        writer.close()


async def test_bad_messages_answer_pusher_error_and_keep_the_socket(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port)
        for raw in ("{not json", '{"data": {}}', '{"event": "pusher:teleport"}', '{"event": "whatever"}'):
            await client.ws.send(raw)
            error = await client.recv()
            assert error["event"] == "pusher:error" and error["data"]["code"] is None, error
        await client.ws.send(b"\x00\x01")
        assert (await client.recv())["event"] == "pusher:error"
        await client.send("pusher:signin", {"auth": "x", "user_data": "{}"})
        assert (await client.recv())["event"] == "pusher:error"
        await client.ping()


async def test_message_over_10_kb_closes_with_1009(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port)
        await client.send("pusher:ping", {"pad": "x" * 10_000})  # just under: read and answered
        assert (await client.recv())["event"] == "pusher:pong"
        await client.send("pusher:ping", {"pad": "x" * 10_300})
        assert await client.closed_with() == 1009


async def test_connection_cap_of_an_app_is_4004(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        first = await PusherClient.connect(port, CAPPED)
        await PusherClient.connect(port, CAPPED)
        error, closed = await refused_with(port, CAPPED.key, QUERY)
        assert (error["data"]["code"], closed) == (4004, 4004)
        await PusherClient.connect(port, APP)  # other apps have their own cap
        await first.ws.close()
        await asyncio.sleep(0.1)
        await PusherClient.connect(port, CAPPED)  # a closed socket frees its place


# --- subscriptions ------------------------------------------------------------------------------------


async def test_public_subscribe_succeeds_with_empty_object_string_also_when_repeated(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port)
        for _ in range(2):  # already subscribed: success again (§2.1)
            reply = await client.subscribe("gps")
            assert reply == {"event": "pusher_internal:subscription_succeeded", "channel": "gps", "data": "{}"}
        await client.ws.send(json.dumps({"event": "pusher:subscribe", "data": json.dumps({"channel": "old"})}))
        assert (await client.recv())["event"] == "pusher_internal:subscription_succeeded"  # data as a string


async def test_private_subscribe_checks_the_signature_and_keeps_the_socket(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, hub, port):
        client = await PusherClient.connect(port)
        assert (await client.subscribed("private-account.acme"))["data"] == "{}"
        other = await PusherClient.connect(port)
        bad = [
            None,  # no auth at all
            "app-key:" + "0" * 64,
            other.sign("private-account.globex"),  # signed for another socket
            channel_auth("chat-key", "chat-secret", client.socket_id, "private-account.globex"),  # another app
        ]
        for auth in bad:
            await client.send(
                "pusher:subscribe", {"channel": "private-account.globex", **({"auth": auth} if auth else {})}
            )
            error = await client.recv()
            assert error["event"] == "pusher:subscription_error" and error["channel"] == "private-account.globex"
            assert (error["data"]["type"], error["data"]["status"]) == ("AuthError", 401), error
        await client.ping()
        await hub.trigger(APP.id, ["private-account.globex"], "location.updated", "{}")
        assert await client.nothing_within(0.2)


@pytest.mark.parametrize(
    ("channel", "status"),
    [("x" * 165, 400), ("private-a b", 400), ("gps/1", 400), ("", 400), ("#server-to-user-u1", 403)],
    ids=["too-long", "space", "slash", "empty", "server-to-user"],
)
async def test_invalid_channels_answer_a_subscription_error(tmp_path: Any, channel: str, status: int) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port)
        error = await client.subscribe(channel)
        assert error["event"] == "pusher:subscription_error" and error["data"]["status"] == status, error
        await client.ping()
        assert (await client.subscribed("x" * 164))["channel"] == "x" * 164


async def test_unsubscribe_stops_events(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, hub, port):
        client = await PusherClient.connect(port)
        await client.subscribed("news")
        await hub.trigger(APP.id, ["news"], "story", "1")
        assert (await client.recv())["data"] == "1"
        await client.send("pusher:unsubscribe", {"channel": "news"})
        await client.send("pusher:unsubscribe", {"channel": "never-joined"})
        await client.ping()  # messages are handled in order: both unsubscribes are done, neither answered
        await hub.trigger(APP.id, ["news"], "story", "2")
        assert await client.nothing_within(0.2)


# --- presence -----------------------------------------------------------------------------------------


def presence_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply
    assert isinstance(reply["data"], str)
    return dict(json.loads(reply["data"])["presence"])


async def test_presence_members_are_users_not_sockets(tmp_path: Any) -> None:
    channel = "presence-account.acme"
    async with pusher_system(tmp_path) as (_, hub, port):
        watcher = await PusherClient.connect(port)
        assert presence_of(await watcher.subscribe(channel, user="u2"))["ids"] == ["u2"]
        tab1 = await PusherClient.connect(port)
        members = presence_of(await tab1.subscribe(channel, user="u1"))
        assert (sorted(members["ids"]), members["count"]) == (["u1", "u2"], 2)
        assert members["hash"]["u1"] == {"name": "User u1"}
        added = await watcher.recv()
        assert added["event"] == "pusher_internal:member_added" and added["channel"] == channel
        assert json.loads(added["data"]) == {"user_id": "u1", "user_info": {"name": "User u1"}}
        assert await tab1.nothing_within(0.1)  # no member_added for itself
        tab2 = await PusherClient.connect(port)
        assert presence_of(await tab2.subscribe(channel, user="u1"))["count"] == 2
        assert await watcher.nothing_within(0.2)  # u1's second connection: no member_added
        assert await hub.users(APP.id, channel) == ["u1", "u2"]
        info = await hub.channel_info(APP.id, channel)
        assert info == {"occupied": True, "subscription_count": 3, "user_count": 2}
        await tab1.send("pusher:unsubscribe", {"channel": channel})
        assert await watcher.nothing_within(0.2)  # u1 still has tab2
        tab2.drop()  # abrupt close of u1's last socket
        removed = await watcher.recv()
        assert removed["event"] == "pusher_internal:member_removed"
        assert json.loads(removed["data"]) == {"user_id": "u1"}
        assert await hub.users(APP.id, channel) == ["u2"]


async def test_presence_numeric_user_id_is_echoed_as_given_and_compared_as_string(tmp_path: Any) -> None:
    channel = "presence-account.acme"
    async with pusher_system(tmp_path) as (_, hub, port):
        watcher = await PusherClient.connect(port)
        await watcher.subscribed(channel, user="w")
        numeric = await PusherClient.connect(port)
        members = presence_of(await numeric.subscribe(channel, user=10))
        assert 10 in members["ids"] and members["hash"]["10"] == {"name": "User 10"}
        assert json.loads((await watcher.recv())["data"])["user_id"] == 10
        textual = await PusherClient.connect(port)
        await textual.subscribed(channel, user="10")  # the same user, by string form
        assert await watcher.nothing_within(0.2)
        assert await hub.users(APP.id, channel) == ["10", "w"]


async def test_presence_needs_signed_channel_data(tmp_path: Any) -> None:
    channel = "presence-account.acme"
    async with pusher_system(tmp_path) as (_, _, port):
        client = await PusherClient.connect(port)
        signed = json.dumps({"user_id": "u1"})
        for data in [
            {"channel": channel, "auth": client.sign(channel)},  # no channel_data
            {"channel": channel, "auth": client.sign(channel, signed), "channel_data": json.dumps({"user_id": "u2"})},
            {
                "channel": channel,
                "auth": client.sign(channel, '{"user_id": true}'),
                "channel_data": '{"user_id": true}',
            },
        ]:
            await client.send("pusher:subscribe", data)
            assert (await client.recv())["event"] == "pusher:subscription_error"
        reply = await client.subscribe(channel, auth=client.sign(channel, signed))  # user=None: not sent
        assert reply["event"] == "pusher:subscription_error"
        await client.send(
            "pusher:subscribe", {"channel": channel, "auth": client.sign(channel, signed), "channel_data": signed}
        )
        assert presence_of(await client.recv())["ids"] == ["u1"]  # no user_info: null


# --- server events ------------------------------------------------------------------------------------


async def test_trigger_relays_data_as_is_and_skips_the_excluded_socket(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, hub, port):
        a, b = await PusherClient.connect(port), await PusherClient.connect(port)
        await a.subscribed("private-encrypted-account.acme")
        await b.subscribed("private-encrypted-account.acme")
        sealed = '{"nonce":"bm9uY2U=","ciphertext":"Y2lwaGVy"}'
        await hub.trigger(APP.id, ["private-encrypted-account.acme"], "secret", sealed)
        for client in (a, b):
            assert await client.recv() == {
                "event": "secret",
                "channel": "private-encrypted-account.acme",
                "data": sealed,
            }
        await hub.trigger(APP.id, ["private-encrypted-account.acme", "none"], "secret", "x", socket_id=a.socket_id)
        assert (await b.recv())["data"] == "x"
        assert await a.nothing_within(0.2)
        await hub.trigger(CHAT.id, ["private-encrypted-account.acme"], "secret", "other app")
        assert await b.nothing_within(0.2)


async def test_location_updates_batch_within_the_window(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (system, _, port):
        account, asset = await PusherClient.connect(port), await PusherClient.connect(port)
        await account.subscribed("private-account.acme")
        await asset.subscribed("private-asset.a1")
        now = time.time()
        await system.publish([position("a1", "acme", lat=1.0, t=now), position("a2", "acme", lat=2.0, t=now)])
        await system.publish([position("a1", "acme", lat=3.0, t=now + 1)])
        batch = await account.recv()
        assert (batch["event"], batch["channel"]) == ("location.updated", "private-account.acme")
        assert isinstance(batch["data"], str)
        updates = json.loads(batch["data"])
        assert [(u["assetId"], u["lat"]) for u in updates] == [("a1", 1.0), ("a2", 2.0), ("a1", 3.0)]
        one_asset = json.loads((await asset.recv())["data"])
        assert [u["lat"] for u in one_asset] == [1.0, 3.0]
        assert await account.nothing_within(0.3)  # one event for the window
        await system.publish([position("a1", "acme", lat=4.0, t=now + 2)])
        single = json.loads((await account.recv())["data"])
        assert isinstance(single, dict)
        assert single["assetId"] == "a1" and single["lat"] == 4.0
        assert {"companyId", "imei", "displayName", "lng", "speed", "heading", "satellites", "moving"} <= set(single)
        assert (single["speed"], single["heading"], single["displayName"]) == (42.0, 90, "A1")
        assert single["timestamp"].endswith("Z") and single["receivedAt"].endswith("Z")
        assert "ignition" not in single and "altitude" not in single  # None fields are left out


async def test_big_batches_split_at_10_kb(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (system, hub, port):
        client = await PusherClient.connect(port)
        await client.subscribed("private-account.acme")
        now = time.time()
        await system.publish([position(f"a{i}", "acme", t=now) for i in range(60)])
        seen: list[str] = []
        while len(seen) < 60:
            event = await client.recv()
            assert len(event["data"].encode()) <= hub.max_message == 10 * 1024
            seen += [u["assetId"] for u in json.loads(event["data"])]
        assert seen == [f"a{i}" for i in range(60)]
        assert await client.nothing_within(0.2)


async def test_no_deliveries_across_companies(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (system, hub, port):
        acme = await PusherClient.connect(port)
        await acme.subscribed("private-account.acme")
        await acme.subscribed("private-asset.a1")
        globex = await PusherClient.connect(port)
        await globex.subscribed("private-account.globex")
        now = time.time()
        await system.publish([position("b1", "globex", t=now), position("b2", "globex", t=now)])
        hub.publish_alert("globex", "b1", {"rule": "overspeed"})
        assert (await globex.recv())["event"] == "alert.triggered"
        assert len(json.loads((await globex.recv())["data"])) == 2
        assert await acme.nothing_within(0.4)  # 0 deliveries across accounts
        await system.publish([position("a1", "acme", t=now)])
        assert {(await acme.recv())["channel"] for _ in range(2)} == {"private-account.acme", "private-asset.a1"}
        assert await globex.nothing_within(0.3)


async def test_alerts_route_to_account_and_asset_channels(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, hub, port):
        account, asset, other = [await PusherClient.connect(port) for _ in range(3)]
        await account.subscribed("private-account.acme")
        await asset.subscribed("private-asset.a1")
        await other.subscribed("private-asset.a2")
        alert = {"rule": "geofence.exit", "assetId": "a1", "severity": "high"}
        hub.publish_alert("acme", "a1", alert)
        for client, channel in ((account, "private-account.acme"), (asset, "private-asset.a1")):
            event = await client.recv()
            assert (event["event"], event["channel"], json.loads(event["data"])) == ("alert.triggered", channel, alert)
        assert await other.nothing_within(0.2)


# --- client events ------------------------------------------------------------------------------------


async def test_client_events_are_off_by_default(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        a, b = await PusherClient.connect(port), await PusherClient.connect(port)
        for client in (a, b):
            await client.subscribed("private-chat")
        await a.send("client-typing", {"from": "a"}, channel="private-chat")
        error = await a.recv()
        assert error["event"] == "pusher:error" and error["data"]["code"] is None
        assert await b.nothing_within(0.2)


async def test_client_events_reach_others_on_private_and_presence_channels_only(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        a, b = await PusherClient.connect(port, CHAT), await PusherClient.connect(port, CHAT)
        for client in (a, b):
            await client.subscribed("private-chat")
            await client.subscribed("public-chat")
            await client.subscribed("private-encrypted-chat")
        await a.subscribed("presence-room", user=7)
        await b.subscribed("presence-room", user="bob")
        await a.recv_event("pusher_internal:member_added")
        await a.send("client-typing", {"from": "a"}, channel="private-chat")
        assert await b.recv() == {"event": "client-typing", "channel": "private-chat", "data": {"from": "a"}}
        await a.send("client-typing", {"from": "a"}, channel="presence-room")
        assert (await b.recv())["user_id"] == 7  # the sender's user id as given, from its signed channel_data
        for channel in ("public-chat", "private-encrypted-chat", "private-not-joined"):
            await a.send("client-typing", {}, channel=channel)
            error = await a.recv()
            assert error["event"] == "pusher:error" and error["data"]["code"] is None, (channel, error)
        assert await a.nothing_within(0.2) and await b.nothing_within(0.1)  # never echoed to the sender


async def test_client_event_rate_limit_is_4301_and_keeps_the_socket(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, _, port):
        a, b = await PusherClient.connect(port, CHAT), await PusherClient.connect(port, CHAT)
        for client in (a, b):
            await client.subscribed("private-chat")
        for i in range(11):
            await a.send("client-move", {"i": i}, channel="private-chat")
        error = await a.recv()
        assert error == {"event": "pusher:error", "data": {"code": 4301, "message": error["data"]["message"]}}
        received = [(await b.recv())["data"]["i"] for _ in range(10)]
        assert received == list(range(10)) and await b.nothing_within(0.2)
        await a.ping()
        await asyncio.sleep(1.0)
        await a.send("client-move", {"i": 11}, channel="private-chat")
        assert (await b.recv())["data"] == {"i": 11}


# --- revocation and termination -----------------------------------------------------------------------


async def test_revoked_grant_closes_with_4009_within_a_second(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (system, hub, port):
        client, bystander = await PusherClient.connect(port), await PusherClient.connect(port)
        await client.subscribed("private-account.acme")
        hub.note_grant(client.socket_id, "jti-1")
        hub.note_grant(bystander.socket_id, "jti-2")
        started = time.monotonic()
        await system.control.revoke("jti-1", time.time() + 3600)
        error = await client.recv()
        assert (error["event"], error["data"]["code"]) == ("pusher:error", 4009)
        assert await client.closed_with() == 4009
        assert time.monotonic() - started < 1.0
        await bystander.ping()
        late = await PusherClient.connect(port)
        hub.note_grant(late.socket_id, "jti-1")  # a grant of a token already revoked
        assert await late.closed_with() == 4009


async def test_terminate_user_closes_every_socket_of_the_user(tmp_path: Any) -> None:
    channel = "presence-account.acme"
    async with pusher_system(tmp_path) as (_, hub, port):
        tabs = [await PusherClient.connect(port) for _ in range(2)]
        for tab in tabs:
            await tab.subscribed(channel, user="u1")
        granted = await PusherClient.connect(port)
        await granted.subscribed("private-account.acme")
        hub.note_grant(granted.socket_id, "jti-9", user_id="u1")
        other = await PusherClient.connect(port)
        await other.subscribed(channel, user="u2")
        await hub.terminate_user(APP.id, "u1")
        for client in (*tabs, granted):
            assert (await client.recv_event("pusher:error"))["data"]["code"] == 4009
            assert await client.closed_with() == 4009
        removed = await other.recv_event("pusher_internal:member_removed")
        assert json.loads(removed["data"]) == {"user_id": "u1"}
        await other.ping()


async def test_http_api_reads_count_subscriptions(tmp_path: Any) -> None:
    async with pusher_system(tmp_path) as (_, hub, port):
        clients = [await PusherClient.connect(port) for _ in range(3)]
        for client in clients:
            await client.subscribed("private-account.acme")
        await clients[0].subscribed("news")
        assert await hub.channels(APP.id) == {"private-account.acme": 3, "news": 1}
        assert await hub.channels(APP.id, "private-") == {"private-account.acme": 3}
        assert await hub.channels(CHAT.id) == {}
        assert await hub.channel_info(APP.id, "news") == {"occupied": True, "subscription_count": 1}
        clients[0].drop()
        await asyncio.sleep(0.1)
        assert await hub.channels(APP.id) == {"private-account.acme": 2}
        assert await hub.channel_info(APP.id, "news") == {"occupied": False, "subscription_count": 0}


# --- two relay instances on one Redis -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_relays(tmp_path: Any, redis_url: str) -> AsyncIterator[list[Relay]]:
    """Two relays reading one bus, with Redis control and presence, as ``fleetgate relay`` twice."""
    bus = MemoryBus(BusSettings())
    async with running_gateway(tmp_path, bus=bus) as gateway:
        relays = []
        for name in ("relay-a", "relay-b"):
            control = RedisControl(redis_url, "t", instance_id=name)
            state = RedisPusherState(redis_url, "t", name)
            relay = Relay(
                relay_settings(instance_id=name), AUTH, bus, gateway.store, control, rest=False, pusher=PUSHER,
                pusher_state=state,
            )  # fmt: skip
            await relay.start()
            relays.append(relay)
        try:
            yield relays
        finally:
            for relay in relays:
                await relay.stop(0.5)


async def test_presence_and_events_across_relay_instances(tmp_path: Any, redis_url: str) -> None:
    channel = "presence-account.acme"
    async with two_relays(tmp_path, redis_url) as (a, b):
        assert a.pusher is not None and b.pusher is not None
        watcher = await PusherClient.connect(a.ws_port)
        await watcher.subscribed(channel, user="w")
        tab1 = await PusherClient.connect(b.ws_port)
        assert presence_of(await tab1.subscribe(channel, user="u1"))["count"] == 2  # sees a's member
        assert json.loads((await watcher.recv())["data"])["user_id"] == "u1"
        tab2 = await PusherClient.connect(a.ws_port)
        await tab2.subscribed(channel, user="u1")  # second connection of u1, on the other instance
        assert await watcher.nothing_within(0.3)
        assert await a.pusher.users(APP.id, channel) == ["u1", "w"]
        assert await b.pusher.channel_info(APP.id, channel) == {
            "occupied": True, "subscription_count": 3, "user_count": 2,
        }  # fmt: skip
        await b.pusher.trigger(APP.id, [channel], "hello", "from b", socket_id=tab2.socket_id)
        assert (await watcher.recv())["data"] == "from b" and (await tab1.recv())["data"] == "from b"
        assert await tab2.nothing_within(0.2)
        tab1.drop()
        assert await watcher.nothing_within(0.3)  # u1 is still on relay a
        await tab2.ws.close()
        assert json.loads((await watcher.recv())["data"]) == {"user_id": "u1"}
