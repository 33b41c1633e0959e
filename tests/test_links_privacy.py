"""Privacy of tracking links: every payload a viewer can obtain, REST and WebSocket, names nothing but the link.

One run walks the whole public flow on a relay with a registered tracker and collects every public
answer (link info, verification, channel auth, polling, refusals) and every WebSocket message the
viewers receive (handshake, subscription, the current position, live positions, ``vehicle.changed``,
``schedule.changed``, ``link.expired``, ``pusher:error``). The test fails if any of them carries the
IMEI, an asset id, the device's or the asset's name, the company, the user who made the link, or a key
that would hold such a thing, at any depth, double-encoded JSON strings included.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from relaykit import Clock, LinkViewer, position, running_system, token

from gateway.records import Device
from relay.settings import LinkSettings, PusherAppSettings, PusherSettings

IMEI = "356307042441013"
ASSET, OTHER_ASSET = "truck-7f3a", "truck-9b2c"
COMPANY = "acme-corp-x"
USER = "office-u1"
DEVICE_NAME = "Truck 7F3A of Hans Example"
FORBIDDEN_VALUES = (IMEI, ASSET, OTHER_ASSET, COMPANY, USER, DEVICE_NAME, ASSET.title(), "Hans Example", "job-7c1e")
FORBIDDEN_KEYS = {
    "imei", "asset_id", "assetid", "asset", "company", "company_id", "companyid", "device", "device_id", "deviceid",
    "user", "user_id", "userid", "job_id", "history", "track", "email", "allowed_emails",
}  # fmt: skip

APP = PusherAppSettings(id="1", key="app-key", secret="app-secret")
LINKS = LinkSettings(verify_per_minute_per_ip=10_000, poll_per_minute_per_session=10_000)
OFFICE = {"Authorization": "Bearer " + token("office", COMPANY, USER)}
MONDAY_10H = datetime(2030, 1, 7, 10, 0, tzinfo=UTC)
OFFICE_HOURS = {"timezone": "UTC", "windows": [{"days": [0, 1, 2, 3, 4], "start": "09:00", "end": "17:00"}]}


class Collected:
    """Every public payload seen, as text, with where it came from."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, str]] = []

    def http(self, what: str, reply: httpx.Response) -> httpx.Response:
        self.payloads.append((what, reply.text))
        return reply

    def socket(self, what: str, viewer: LinkViewer) -> None:
        self.payloads += [(f"{what}: {m['event']}", json.dumps(m)) for m in viewer.messages]


def keys_of(value: Any) -> set[str]:
    """Every object key at any depth; strings that hold JSON (channel event data) are opened too."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return keys_of(json.loads(value))
        except ValueError:
            return set()
    if isinstance(value, dict):
        return {str(k).lower() for k in value} | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


def leaks(payloads: list[tuple[str, str]]) -> list[str]:
    found = []
    for what, text in payloads:
        found += [f"{what}: value {v!r}" for v in FORBIDDEN_VALUES if v.lower() in text.lower()]
        found += [f"{what}: key {k!r}" for k in sorted(keys_of(text) & FORBIDDEN_KEYS)]
    return found


async def test_no_public_payload_names_the_tracker_the_company_or_anyone(tmp_path: Any) -> None:
    device = Device(imei=IMEI, asset_id=ASSET, company_id=COMPANY, display_name=DEVICE_NAME)
    clock = Clock()
    clock.set(MONDAY_10H)
    seen = Collected()
    async with (
        running_system(
            tmp_path, devices=[device], rest=True, pusher=PusherSettings(apps=[APP]), links=LINKS, clock=clock
        ) as system,
        httpx.AsyncClient(base_url=system.rest_url, timeout=5) as http,
    ):

        def record(asset: str = ASSET, imei: str = IMEI, ago: float = 0.0, **fields: Any) -> Any:
            """A position at the link service's time (links count arrivals after their creation only)."""
            return position(asset, COMPANY, imei=imei, t=clock().timestamp() - ago, **fields)

        async def create(**fields: Any) -> str:
            body = {"asset_id": ASSET, "display_name": "Your parcel", "job_id": "job-7c1e", "session_ttl_s": 86400}
            reply = await http.post("/api/tracking-links", json={**body, **fields}, headers=OFFICE)
            assert reply.status_code == 201, reply.text
            return str(reply.json()["uuid"])

        async def viewer(link: str) -> tuple[LinkViewer, str]:
            public = f"/api/public/tracking-links/{link}"
            seen.http("info", await http.get(public))
            session = seen.http("verify", await http.post(f"{public}/verify")).json()["session_token"]
            socket = await LinkViewer.connect(system.relay.ws_port, APP.key)
            seen.http("auth", await socket.authorise(http, link, session))
            await socket.watch(http, link, session)
            return socket, session

        async def poll(link: str, session: str) -> None:
            headers = {"Authorization": f"Bearer {session}"}
            seen.http("poll", await http.get(f"/api/public/tracking-links/{link}/location", headers=headers))

        await system.publish([record(lat=52.50, lng=13.40, ago=5)])
        # Arrival, with distance and ETA on the way: positions, then link.expired + 4004.
        arriving = await create(arrival={"lat": 52.52, "lng": 13.405, "radius_m": 200}, schedule=OFFICE_HOURS)
        watcher, session = await viewer(arriving)
        await watcher.next("location.updated")  # the current position
        await poll(arriving, session)
        await system.publish([record(lat=52.51, lng=13.40)])
        assert "eta_minutes" in json.loads((await watcher.next("location.updated"))["data"])
        await poll(arriving, session)
        await system.publish([record(lat=52.5201, lng=13.4051)])
        await watcher.refused()
        seen.socket("arrival viewer", watcher)
        await poll(arriving, session)  # 4004 now
        # Another vehicle, then disabled: vehicle.changed, link.expired + 4004.
        moving = await create()
        watcher, session = await viewer(moving)
        moved = await http.patch(f"/api/tracking-links/{moving}", json={"asset_id": OTHER_ASSET}, headers=OFFICE)
        assert moved.is_success, moved.text
        await watcher.next("vehicle.changed")
        await system.publish([record(OTHER_ASSET, "356307042441021", lat=48.1, lng=11.6)])
        await watcher.next("location.updated")
        await poll(moving, session)
        disabled = await http.patch(f"/api/tracking-links/{moving}", json={"enabled": False}, headers=OFFICE)
        assert disabled.is_success, disabled.text
        await watcher.refused()
        seen.socket("vehicle viewer", watcher)
        # Leaving the schedule window: schedule.changed + 4005.
        scheduled = await create(schedule=OFFICE_HOURS)
        watcher, session = await viewer(scheduled)
        clock.set(MONDAY_10H + timedelta(hours=8))
        await watcher.refused(timeout=3)
        seen.socket("schedule viewer", watcher)
        await poll(scheduled, session)
        seen.http("info outside the window", await http.get(f"/api/public/tracking-links/{scheduled}"))
        # Refusals: a session of another link, an unknown token, a deleted link.
        intruder = await LinkViewer.connect(system.relay.ws_port, APP.key)
        seen.http("auth refused", await intruder.authorise(http, moving, session))
        seen.http("auth unknown", await intruder.authorise(http, scheduled, "y" * 43))
        await http.delete(f"/api/tracking-links/{moving}", headers=OFFICE)
        seen.http("info deleted", await http.get(f"/api/public/tracking-links/{moving}"))

    kinds = {what.split(": ")[-1] for what, _ in seen.payloads}
    assert {"location.updated", "vehicle.changed", "schedule.changed", "link.expired", "pusher:error"} <= kinds
    assert {"info", "verify", "auth", "poll"} <= kinds
    assert len(seen.payloads) > 30
    assert leaks(seen.payloads) == []


def test_the_leak_check_finds_what_it_looks_for() -> None:
    planted = [
        ("a", json.dumps({"data": json.dumps({"lat": 1, "assetId": "x"})})),
        ("b", f'{{"note": "from {IMEI}"}}'),
        ("c", json.dumps({"nested": [{"Company_Id": "z"}]})),
    ]
    assert leaks(planted) == ["a: key 'assetid'", f"b: value {IMEI!r}", "c: key 'company_id'"]
