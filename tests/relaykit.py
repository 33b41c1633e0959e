"""Building blocks for relay tests: gateway + relay in one loop on port 0, tokens, a native-protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from gatewaykit import running_gateway
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.bus.memory import MemoryBus
from gateway.records import Device, TrackedPosition, record_id
from gateway.service import Gateway
from gateway.settings import BusSettings
from relay.control import Control, open_control
from relay.links.store import open_link_store
from relay.service import Relay
from relay.settings import AuthSettings, LinkSettings, PusherSettings, RelaySettings
from relay.tokens import mint_token

SECRET = "relay-test-secret-of-at-least-32-bytes"


def relay_settings(**overrides: Any) -> RelaySettings:
    base: dict[str, Any] = {"host": "127.0.0.1", "ws_port": 0, "rest_port": 0, "auth_timeout_s": 5.0}
    base.update(overrides)
    return msgspec.convert(base, RelaySettings)


AUTH = AuthSettings(secret=SECRET)


def token(role: str, company: str, user: str, ttl_s: float = 3600.0, **extra: Any) -> str:
    return mint_token(AUTH, role=role, company=company, user=user, ttl_s=ttl_s, **extra)


@dataclass
class System:
    gateway: Gateway
    relay: Relay
    control: Control

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.ws_port}/ws"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.relay.rest_port}"

    @property
    def bus(self) -> Any:
        return self.gateway.bus

    async def publish(self, records: Sequence[TrackedPosition]) -> None:
        """Commit records as the gateway's committer does: bus write, then last positions."""
        await self.gateway.bus.publish(records)
        await self.gateway.store.save_last_positions(records)


@contextlib.asynccontextmanager
async def running_system(
    tmp_path: Any,
    *,
    devices: Sequence[Device] = (),
    rest: bool = False,
    pusher: PusherSettings | None = None,
    links: LinkSettings | None = None,
    clock: Callable[[], datetime] | None = None,
    **relay: Any,
) -> AsyncIterator[System]:
    """Gateway and relay in this loop on one memory bus and one SQLite store, as ``fleetgate run`` wires them.

    ``pusher``: the ``[pusher]`` section (default: its defaults, the Pusher protocol on). ``links``: the
    ``[links]`` section, tracking links on, their store in ``tmp_path``; ``clock`` then replaces the
    link service's clock (status, schedules, session and code expiry)."""
    bus = MemoryBus(BusSettings())
    async with running_gateway(tmp_path, devices=devices, bus=bus) as gateway:
        control = open_control("memory", "", "fleetgate")
        link_store = None
        if links is not None:
            link_store = open_link_store("sqlite", sqlite_path=str(tmp_path / "links.sqlite"), redis_url="", prefix="")
        service = Relay(
            relay_settings(**relay),
            AUTH,
            bus,
            gateway.store,
            control,
            rest=rest,
            pusher=pusher,
            links=links,
            link_store=link_store,
        )
        await service.start()
        if clock is not None and service.links is not None:
            service.links.clock = clock
        await asyncio.wait_for(service.feed_ready.wait(), 2.0)
        try:
            yield System(gateway, service, control)
        finally:
            await service.stop(0.5)


def position(
    asset: str, company: str, *, lat: float = 52.0, lng: float = 13.0, t: float | None = None, imei: str = ""
) -> TrackedPosition:
    """A committed record as the pipeline would produce it (for publishing straight onto the bus)."""
    fix = datetime.fromtimestamp(t if t is not None else time.time(), UTC)
    imei = imei or f"imei-{asset}"
    return TrackedPosition(
        record_id(imei, fix, "position"), "position", imei, asset, company, asset.title(), "teltonika",
        fix, datetime.now(UTC), lat, lng, 42.0, 90, 9, True, True,
    )  # fmt: skip


class JsonSocket:
    """A test peer on a real websockets connection speaking JSON text frames: what every client here reads with."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def recv(self, timeout: float = 3.0) -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(self.ws.recv(), timeout)))

    async def next_where(self, key: str, value: str, timeout: float = 3.0) -> dict[str, Any]:
        """The next message whose ``key`` is ``value``, skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message.get(key) == value:
                    return message

    async def nothing_within(self, seconds: float) -> bool:
        try:
            message = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected message: {message!r}")

    async def closed_with(self, timeout: float = 3.0) -> int | None:
        """Read until the server closes; the close code it sent."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.recv(timeout)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        raise AssertionError("not closed")

    async def close(self) -> None:
        await self.ws.close()


class Client(JsonSocket):
    """A native-protocol client."""

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        return cls(await connect(url, open_timeout=5, **kwargs))

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def recv_type(self, kind: str, timeout: float = 3.0) -> dict[str, Any]:
        """The next message of type ``kind``, skipping others."""
        return await self.next_where("type", kind, timeout)

    async def auth(self, role: str, company: str, user: str, ttl_s: float = 3600.0, **extra: Any) -> dict[str, Any]:
        await self.send(
            {"action": "auth", "user_id": user, "role": role, "token": token(role, company, user, ttl_s, **extra)}
        )
        return await self.recv()


async def office(url: str, company: str, user: str = "office-1", **extra: Any) -> Client:
    client = await Client.connect(url)
    reply = await client.auth("office", company, user, **extra)
    assert reply["type"] == "authenticated", reply
    return client


async def driver(url: str, company: str, user: str, **extra: Any) -> Client:
    client = await Client.connect(url)
    reply = await client.auth("driver", company, user, **extra)
    assert reply["type"] == "authenticated", reply
    return client


# --- tracking links: an injectable clock and a viewer on the Pusher protocol -------------------------------


class Clock:
    """The link service's clock for tests: real time plus an offset that a test moves (``jump``, ``set``)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def jump(self, **delta: float) -> None:
        self.offset += timedelta(**delta)

    def set(self, moment: datetime) -> None:
        self.offset = moment - datetime.now(UTC)


def link_channel(link_uuid: str) -> str:
    return f"private-tracking-link.{link_uuid}"


class LinkViewer(JsonSocket):
    """A tracking-link viewer as pusher-js behaves, on a raw websockets connection: the channel is authorised
    at ``/broadcasting/auth`` with the session token. Every message received is kept in ``messages``."""

    def __init__(self, ws: ClientConnection, socket_id: str, established: dict[str, Any]) -> None:
        super().__init__(ws)
        self.socket_id = socket_id
        self.messages: list[dict[str, Any]] = [established]

    @classmethod
    async def connect(cls, ws_port: int, key: str) -> LinkViewer:
        ws = await connect(f"ws://127.0.0.1:{ws_port}/app/{key}?protocol=7&client=js&version=8.6.0", open_timeout=5)
        established = json.loads(await asyncio.wait_for(ws.recv(), 3))
        assert established["event"] == "pusher:connection_established", established
        return cls(ws, json.loads(established["data"])["socket_id"], established)

    async def send(self, event: str, data: Any, channel: str | None = None) -> None:
        message: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            message["channel"] = channel
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 3.0) -> dict[str, Any]:
        message = await super().recv(timeout)
        self.messages.append(message)
        return message

    async def next(self, event: str, timeout: float = 3.0) -> dict[str, Any]:
        """The next message named ``event``, skipping others."""
        return await self.next_where("event", event, timeout)

    async def authorise(self, http: Any, link_uuid: str, session_token: str) -> Any:
        """``POST /broadcasting/auth`` as pusher-js sends it (form body, bearer session token); the response."""
        form = {"socket_id": self.socket_id, "channel_name": link_channel(link_uuid)}
        return await http.post("/broadcasting/auth", data=form, headers={"Authorization": f"Bearer {session_token}"})

    async def subscribe(self, link_uuid: str, auth: str | None) -> dict[str, Any]:
        """Send ``pusher:subscribe`` (``auth`` None: without one); the first reply about it."""
        data = {"channel": link_channel(link_uuid), **({"auth": auth} if auth is not None else {})}
        await self.send("pusher:subscribe", data)
        async with asyncio.timeout(5.0):
            while True:
                message = await self.recv(5.0)
                if message["event"] in ("pusher:error", "pusher:subscription_error") or message.get("channel"):
                    return message

    async def watch(self, http: Any, link_uuid: str, session_token: str) -> dict[str, Any]:
        """Authorise and subscribe; the ``subscription_succeeded`` message."""
        reply = await self.authorise(http, link_uuid, session_token)
        assert reply.status_code == 200, reply.text
        message = await self.subscribe(link_uuid, reply.json()["auth"])
        assert message["event"] == "pusher_internal:subscription_succeeded", message
        return message

    async def ping(self) -> None:
        await self.send("pusher:ping", {})
        await self.next("pusher:pong")

    async def refused(self, timeout: float = 3.0) -> tuple[int, int | None]:
        """The code of the next ``pusher:error`` and the close code that follows it."""
        error = await self.next("pusher:error", timeout)
        return error["data"]["code"], await self.closed_with(timeout)

    def events(self, name: str) -> list[Any]:
        """The decoded data of every ``name`` event received so far."""
        return [json.loads(m["data"]) for m in self.messages if m["event"] == name]
