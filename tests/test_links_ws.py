"""Tracking-link viewers on the Pusher protocol: raw websockets clients, the REST API over httpx, one relay
(and two on one Redis), records on the bus as the gateway commits them.

Each close code (4001-4005) is checked on subscribe and while connected; time is the link service's
clock (:class:`relaykit.Clock`, real time plus an offset the tests move), as the relay re-evaluates
links on a 1 s tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from gatewaykit import running_gateway
from relaykit import AUTH, Clock, LinkViewer, System, link_channel, position, relay_settings, running_system, token
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.bus.memory import MemoryBus
from gateway.settings import BusSettings
from relay.control import RedisControl
from relay.links.store import open_link_store
from relay.pusher_auth import channel_auth
from relay.pusher_state import RedisPusherState
from relay.service import Relay
from relay.settings import LinkSettings, PusherAppSettings, PusherSettings

APP = PusherAppSettings(id="1", key="app-key", secret="app-secret")
PUSHER = PusherSettings(apps=[APP])
LINKS = LinkSettings(verify_per_minute_per_ip=10_000, poll_per_minute_per_session=10_000)
OFFICE = {"Authorization": "Bearer " + token("office", "acme", "office-1")}
GRANT_WAIT_S = 0.3  # how long a subscribe waits for its grant here (the relay's default: 2 s)
MONDAY_10H = datetime(2030, 1, 7, 10, 0, tzinfo=UTC)
OFFICE_HOURS = {"timezone": "UTC", "windows": [{"days": [0, 1, 2, 3, 4], "start": "09:00", "end": "17:00"}]}


@dataclass
class Links:
    """A running relay with tracking links, its REST API and the link service's clock."""

    system: System
    http: httpx.AsyncClient
    clock: Clock

    async def create(self, asset: str = "a1", **fields: Any) -> str:
        body = {"asset_id": asset, "display_name": "Your delivery", **fields}
        reply = await self.http.post("/api/tracking-links", json=body, headers=OFFICE)
        assert reply.status_code == 201, reply.text
        return str(reply.json()["uuid"])

    async def session(self, link_uuid: str) -> str:
        reply = await self.http.post(f"/api/public/tracking-links/{link_uuid}/verify")
        assert reply.status_code == 200, reply.text
        return str(reply.json()["session_token"])

    async def patch(self, link_uuid: str, **fields: Any) -> dict[str, Any]:
        reply = await self.http.patch(f"/api/tracking-links/{link_uuid}", json=fields, headers=OFFICE)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    async def delete(self, link_uuid: str) -> None:
        reply = await self.http.delete(f"/api/tracking-links/{link_uuid}", headers=OFFICE)
        assert reply.status_code == 204, reply.text

    async def connect(self) -> LinkViewer:
        return await LinkViewer.connect(self.system.relay.ws_port, APP.key)

    async def viewer(self, link_uuid: str, session_token: str | None = None) -> LinkViewer:
        """A socket subscribed to the link (with a new session unless given one)."""
        viewer = await self.connect()
        await viewer.watch(self.http, link_uuid, session_token or await self.session(link_uuid))
        return viewer

    async def granted(self, link_uuid: str, session_token: str | None = None) -> tuple[LinkViewer, str]:
        """A socket whose channel auth succeeded, not subscribed yet; and the signature."""
        viewer = await self.connect()
        reply = await viewer.authorise(self.http, link_uuid, session_token or await self.session(link_uuid))
        assert reply.status_code == 200, reply.text
        return viewer, str(reply.json()["auth"])

    async def publish(self, asset: str = "a1", company: str = "acme", **fields: Any) -> None:
        await self.system.publish([position(asset, company, **fields)])


@contextlib.asynccontextmanager
async def tracking(
    tmp_path: Any, links: LinkSettings = LINKS, pusher: PusherSettings = PUSHER, **relay: Any
) -> AsyncIterator[Links]:
    clock = Clock()
    async with running_system(tmp_path, rest=True, pusher=pusher, links=links, clock=clock, **relay) as system:
        assert system.relay.link_channels is not None
        system.relay.link_channels.grant_wait_s = GRANT_WAIT_S
        async with httpx.AsyncClient(base_url=system.rest_url, timeout=5) as http:
            yield Links(system, http, clock)


def data_of(message: dict[str, Any]) -> Any:
    assert isinstance(message["data"], str), message  # channel events carry a JSON string (pusher.md §2)
    return json.loads(message["data"])


def assert_access_error(reply: httpx.Response, status: int, code: int) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error", "code", "message"} and body["code"] == code, body


# --- subscribing and positions ------------------------------------------------------------------------


async def test_a_verified_viewer_gets_the_current_position_then_live_ones_of_its_link_only(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        await t.publish(lat=52.5, lng=13.4, t=time.time() - 5)  # known before anyone watches
        link = await t.create()
        viewer = await t.viewer(link)
        snapshot = data_of(await viewer.next("location.updated"))
        assert (snapshot["lat"], snapshot["lng"], snapshot["display_name"]) == (52.5, 13.4, "Your delivery")
        assert snapshot["address"] == "Berlin, Germany"
        assert set(snapshot) == {"lat", "lng", "speed", "heading", "status", "address", "display_name", "timestamp"}
        await t.publish("a2", lat=1.0)  # another asset
        await t.publish("a1", "globex", lat=2.0, imei="356307042441013")  # the same asset id in another company
        await t.publish("a1", lat=52.6, lng=13.5)
        live = await viewer.next("location.updated")
        assert live["channel"] == link_channel(link)
        assert (data_of(live)["lat"], data_of(live)["status"], data_of(live)["speed"]) == (52.6, "moving", 42.0)
        with contextlib.suppress(TimeoutError):
            await viewer.next("location.updated", timeout=0.4)
            raise AssertionError("a position of another asset or company reached the viewer")


async def test_distance_and_eta_only_with_arrival_expiration(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        plain = await t.create()
        arriving = await t.create(arrival={"lat": 52.0, "lng": 14.0, "radius_m": 100})
        viewers = [await t.viewer(plain), await t.viewer(arriving)]
        await t.publish(lat=52.0, lng=13.0)
        without, with_eta = [data_of(await v.next("location.updated")) for v in viewers]
        assert "distance_km" not in without and "eta_minutes" not in without
        assert 68 < with_eta["distance_km"] < 69  # straight line, 1 degree of longitude at 52 N
        assert with_eta["eta_minutes"] == round(with_eta["distance_km"] / 42.0 * 60, 1)  # at the recent 42 km/h


async def test_positions_are_coalesced_to_10_per_second_ending_with_the_latest(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create()
        viewer = await t.viewer(link)
        start = time.time()
        for i in range(100):  # 100 records within about 0.9 s, straight onto the bus
            await t.system.bus.publish([position("a1", "acme", lat=50.0 + i / 1000, t=start + i / 100)])
            await asyncio.sleep(0.009)
        elapsed = time.time() - start
        received: list[float] = []
        with contextlib.suppress(TimeoutError):
            while True:
                received.append(data_of(await viewer.next("location.updated", timeout=0.6))["lat"])
        # The first at once, then at most one per 100 ms: coalesced, not queued (a queue would deliver 100).
        assert 2 <= len(received) <= 10 * elapsed + 2, (elapsed, received)
        assert received[-1] == 50.099  # the latest record, never a stale one last
        assert received == sorted(received)


async def test_vehicle_change_tells_viewers_and_switches_the_positions(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create("a1")
        viewer = await t.viewer(link)
        await t.patch(link, asset_id="a2", display_name="Your delivery (van 2)")
        changed = await viewer.next("vehicle.changed")
        assert data_of(changed) == {"display_name": "Your delivery (van 2)"}
        await t.publish("a1", lat=1.0)
        await t.publish("a2", lat=2.0)
        moved = data_of(await viewer.next("location.updated"))
        assert (moved["lat"], moved["display_name"]) == (2.0, "Your delivery (van 2)")
        await viewer.ping()


async def test_client_events_are_refused_on_link_channels(tmp_path: Any) -> None:
    chatty = PusherSettings(apps=[PusherAppSettings(id="1", key="app-key", secret="s", enable_client_messages=True)])
    async with tracking(tmp_path, pusher=chatty) as t:
        link = await t.create()
        a, b = await t.viewer(link), await t.viewer(link)
        await a.send("client-hello", {"hi": 1}, channel=link_channel(link))
        error = await a.next("pusher:error")
        assert error["data"]["code"] is None
        with contextlib.suppress(TimeoutError):
            await b.next("client-hello", timeout=0.3)
            raise AssertionError("a viewer's client event reached another viewer")


# --- authorisation ------------------------------------------------------------------------------------


async def test_a_session_opens_its_own_link_only(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link_a, link_b = await t.create("a1"), await t.create("a2")
        session_a = await t.session(link_a)
        viewer = await t.connect()
        assert_access_error(await viewer.authorise(t.http, link_b, session_a), 401, 4001)
        signed_for_a = (await viewer.authorise(t.http, link_a, session_a)).json()["auth"]
        for auth in (None, signed_for_a, "app-key:" + "0" * 64):  # forged subscribes to B
            refused = await viewer.subscribe(link_b, auth)
            assert refused["event"] == "pusher:subscription_error", refused
            assert refused["data"]["status"] == 401
        await viewer.ping()  # the socket stays open, as for any bad signature
        await viewer.watch(t.http, link_a, session_a)
        # A valid signature (made with the app secret) without a session's grant: 4001, closed.
        intruder = await t.connect()
        signature = channel_auth(APP.key, APP.secret, intruder.socket_id, link_channel(link_b))
        assert (await intruder.subscribe(link_b, signature))["data"]["code"] == 4001
        assert await intruder.closed_with() == 4001
        # An office access token is no session token.
        office = await t.connect()
        form = {"socket_id": office.socket_id, "channel_name": link_channel(link_a)}
        assert_access_error(await t.http.post("/broadcasting/auth", data=form, headers=OFFICE), 401, 4001)
        assert_access_error(await t.http.post("/broadcasting/auth", data=form), 401, 4001)


async def test_every_code_on_subscribe(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        t.clock.set(MONDAY_10H)
        # 4001: an unknown session token
        garbage = await t.connect()
        assert_access_error(await garbage.authorise(t.http, await t.create(), "x" * 43), 401, 4001)
        # 4002: the session expired between the channel auth and the subscribe
        link = await t.create(session_ttl_s=60)
        late, auth = await t.granted(link)
        t.clock.jump(seconds=61)
        assert (await late.subscribe(link, auth))["data"]["code"] == 4002
        assert await late.closed_with() == 4002
        t.clock.set(MONDAY_10H)
        # 4003: deleted
        gone = await t.create()
        viewer, auth = await t.granted(gone)
        await t.delete(gone)
        assert (await viewer.subscribe(gone, auth))["data"]["code"] == 4003
        assert await viewer.closed_with() == 4003
        # 4004: disabled, and expired by time
        disabled = await t.create()
        session = await t.session(disabled)
        viewer, auth = await t.granted(disabled, session)
        await t.patch(disabled, enabled=False)
        assert_access_error(await (await t.connect()).authorise(t.http, disabled, session), 403, 4004)
        assert (await viewer.subscribe(disabled, auth))["data"]["code"] == 4004
        assert await viewer.closed_with() == 4004
        ending = await t.create(expires_at=(MONDAY_10H + timedelta(hours=1)).isoformat())
        viewer, auth = await t.granted(ending)
        t.clock.jump(hours=2)
        assert (await viewer.subscribe(ending, auth))["data"]["code"] == 4004
        assert await viewer.closed_with() == 4004
        t.clock.set(MONDAY_10H)
        # 4005: outside the schedule window (office hours, and it is 18:00 now)
        scheduled = await t.create(schedule=OFFICE_HOURS, session_ttl_s=24 * 3600)
        session = await t.session(scheduled)
        viewer, auth = await t.granted(scheduled, session)
        t.clock.set(MONDAY_10H + timedelta(hours=8))
        assert_access_error(await (await t.connect()).authorise(t.http, scheduled, session), 403, 4005)
        assert (await viewer.subscribe(scheduled, auth))["data"]["code"] == 4005
        assert await viewer.closed_with() == 4005


# --- while connected ------------------------------------------------------------------------------------


async def test_disabling_closes_viewers_within_a_second_with_link_expired(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link, other = await t.create("a1"), await t.create("a1")
        viewers = [await t.viewer(link), await t.viewer(link)]
        bystander = await t.viewer(other)
        started = time.monotonic()
        await t.patch(link, enabled=False)
        for viewer in viewers:
            assert data_of(await viewer.next("link.expired")) == {"reason": "disabled"}
            assert await viewer.refused() == (4004, 4004)
        assert time.monotonic() - started < 1.0
        await bystander.ping()


async def test_deleting_closes_viewers_with_4003(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create()
        viewer = await t.viewer(link)
        started = time.monotonic()
        await t.delete(link)
        assert await viewer.refused() == (4003, 4003)
        assert time.monotonic() - started < 1.0
        assert not viewer.events("link.expired")


async def test_ending_sessions_while_connected_is_4001(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create()
        viewer = await t.viewer(link)
        await t.patch(link, access_mode="email")  # a change of access ends every session of the link
        assert await viewer.refused() == (4001, 4001)
        # A session gone from the store behind the relay's back: found at the link's next change.
        other = await t.create()
        viewer = await t.viewer(other)
        links = t.system.relay.links
        assert links is not None
        assert await links.store.delete_sessions(other) == 1
        await t.patch(other, display_name="Renamed")
        assert await viewer.refused() == (4001, 4001)


async def test_session_expiry_closes_only_that_sessions_socket_with_4002(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create(session_ttl_s=600)
        early = await t.viewer(link)
        t.clock.jump(seconds=300)
        late = await t.viewer(link)
        t.clock.jump(seconds=301)  # the first session is 601 s old, the second 301 s
        assert await early.refused(timeout=2.5) == (4002, 4002)
        await late.ping()


async def test_expiry_by_time_sends_link_expired_then_4004(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create(expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
        viewer = await t.viewer(link)
        t.clock.jump(hours=1, seconds=1)
        assert data_of(await viewer.next("link.expired", timeout=2.5)) == {"reason": "time"}
        assert await viewer.refused() == (4004, 4004)


async def test_leaving_the_schedule_window_sends_schedule_changed_then_4005(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        t.clock.set(MONDAY_10H)
        link = await t.create(schedule=OFFICE_HOURS)
        viewer = await t.viewer(link)
        t.clock.set(MONDAY_10H + timedelta(hours=7, minutes=1))  # 17:01 on Monday
        changed = data_of(await viewer.next("schedule.changed", timeout=2.5))
        assert changed == {"status": "outside_schedule", "next_change": "2030-01-08T09:00:00Z"}
        assert await viewer.refused() == (4005, 4005)
        info = (await t.http.get(f"/api/public/tracking-links/{link}")).json()
        assert info["status"] == "outside_schedule"


async def test_arrival_expires_the_link_and_closes_viewers(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create(arrival={"lat": 52.52, "lng": 13.405, "radius_m": 200})
        viewer = await t.viewer(link)
        await t.publish(lat=52.0, lng=13.0)
        assert data_of(await viewer.next("location.updated"))["distance_km"] > 50
        await t.publish(lat=52.5201, lng=13.4051)  # within 200 m
        assert data_of(await viewer.next("link.expired")) == {"reason": "arrival"}
        assert await viewer.refused() == (4004, 4004)
        stored = (await t.http.get(f"/api/tracking-links/{link}", headers=OFFICE)).json()
        assert (stored["status"], stored["expired_reason"]) == ("expired", "arrival")


# --- limits ---------------------------------------------------------------------------------------------


async def test_connections_per_ip_over_the_cap_get_4100(tmp_path: Any) -> None:
    capped = LinkSettings(ws_connections_per_ip=3, verify_per_minute_per_ip=10_000)
    async with tracking(tmp_path, links=capped) as t:
        held = [await t.connect() for _ in range(3)]
        async with connect(f"ws://127.0.0.1:{t.system.relay.ws_port}/app/{APP.key}?protocol=7") as over:
            error = json.loads(await asyncio.wait_for(over.recv(), 3))
            assert error == {"event": "pusher:error", "data": {"code": 4100, "message": error["data"]["message"]}}
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(over.recv(), 3)
            assert over.close_code == 4100  # pusher-js retries after 1 s
        await held[0].close()
        await asyncio.sleep(0.1)
        await t.connect()  # a closed socket frees its place


# --- two relay instances -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_relays(tmp_path: Any, redis_url: str) -> AsyncIterator[list[Relay]]:
    """Two relays on one bus, with Redis control, presence and link store (``fleetgate relay`` twice)."""
    bus = MemoryBus(BusSettings())
    async with running_gateway(tmp_path, bus=bus) as gateway:
        relays = []
        for name in ("relay-a", "relay-b"):
            relay = Relay(
                relay_settings(instance_id=name), AUTH, bus, gateway.store,
                RedisControl(redis_url, "t", instance_id=name), rest=True, pusher=PUSHER,
                pusher_state=RedisPusherState(redis_url, "t", name), links=LINKS,
                link_store=open_link_store("redis", sqlite_path="", redis_url=redis_url, prefix="t"),
            )  # fmt: skip
            await relay.start()
            relays.append(relay)
        try:
            yield relays
        finally:
            for relay in relays:
                await relay.stop(0.5)


async def test_disabling_on_one_instance_closes_viewers_on_another_within_a_second(
    tmp_path: Any, redis_url: str
) -> None:
    async with (
        two_relays(tmp_path, redis_url) as (a, b),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.rest_port}", timeout=5) as http,
    ):
        reply = await http.post("/api/tracking-links", json={"asset_id": "a1", "display_name": "X"}, headers=OFFICE)
        link = reply.json()["uuid"]
        session = (await http.post(f"/api/public/tracking-links/{link}/verify")).json()["session_token"]
        on_b = await LinkViewer.connect(b.ws_port, APP.key)
        await on_b.watch(http, link, session)  # authorised by A: the grant travels to B
        started = time.monotonic()
        assert (await http.patch(f"/api/tracking-links/{link}", json={"enabled": False}, headers=OFFICE)).is_success
        assert data_of(await on_b.next("link.expired")) == {"reason": "disabled"}
        assert await on_b.refused() == (4004, 4004)
        assert time.monotonic() - started < 1.0
