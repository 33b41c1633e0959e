"""Tracking links over REST: management API and the public flow, on a real relay (uvicorn socket, SQLite
link store, memory control) with a real SMTP server on loopback (aiosmtpd) receiving the code mails.

The link service's clock is injected (schedules, expiry of links, sessions and codes); it starts at the
real time, because the stores also drop what has expired by the real clock.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from relaykit import System, position, running_system, token
from servers import free_port

from relay.control import ControlMessage
from relay.links import model
from relay.links.service import LinkService
from relay.links.store import LinkStore
from relay.settings import LinkSettings

PUBLIC = "/api/public/tracking-links"
JANE = "jane@example.com"
EVERY_DAY = [0, 1, 2, 3, 4, 5, 6]


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Inbox:
    """The aiosmtpd handler: keeps every mail it accepts."""

    mails: list[tuple[list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [message for rcpt, message in self.mails if address in rcpt]

    async def code_for(self, address: str, timeout: float = 3.0) -> str:
        """The 6-digit code of the latest mail to ``address``, waiting for it to arrive."""
        async with asyncio.timeout(timeout):
            while not self.to(address):
                await asyncio.sleep(0.01)
        body = self.to(address)[-1].get_body(("plain",))
        assert body is not None
        found = re.search(r"\b(\d{6})\b", body.get_content())
        assert found is not None
        return found.group(1)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Env:
    system: System
    client: httpx.AsyncClient
    inbox: Inbox
    clock: Clock
    hints: list[ControlMessage]

    @property
    def links(self) -> LinkService:
        assert self.system.relay.links is not None
        return self.system.relay.links

    @property
    def store(self) -> LinkStore:
        return self.links.store

    async def create(self, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
        body = {"asset_id": "truck-7", "display_name": "Your delivery", **body}
        response = await self.client.post("/api/tracking-links", headers=headers or ACME, json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def verify(self, uuid: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.client.post(f"{PUBLIC}/{uuid}/verify", json=body)

    async def session(self, uuid: str, body: dict[str, Any] | None = None) -> str:
        response = await self.verify(uuid, body)
        assert response.status_code == 200, response.text
        return str(response.json()["session_token"])

    async def poll(self, uuid: str, session_token: str) -> httpx.Response:
        return await self.client.get(f"{PUBLIC}/{uuid}/location", headers=bearer(session_token))

    def events(self, uuid: str) -> list[str]:
        return [h.data["event"] for h in self.hints if h.kind == "link_changed" and h.data["uuid"] == uuid]


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def link_settings(smtp_port: int, **overrides: Any) -> LinkSettings:
    base: dict[str, Any] = {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_tls": "none"}
    return msgspec.convert({**base, **overrides}, LinkSettings)


@pytest.fixture
async def env(tmp_path: Path, smtp: tuple[Inbox, int]) -> AsyncIterator[Env]:
    inbox, port = smtp
    clock = Clock()
    async with running_system(tmp_path, rest=True, links=link_settings(port), clock=clock) as system:
        hints: list[ControlMessage] = []
        system.control.add_listener(hints.append)
        async with httpx.AsyncClient(base_url=system.rest_url, timeout=5.0) as client:
            yield Env(system, client, inbox, clock, hints)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


ACME = bearer(token("office", "acme", "office-1"))
ACME_ADMIN = bearer(token("admin", "acme", "admin-1"))
GLOBEX = bearer(token("office", "globex", "office-2"))
ROOT = bearer(token("admin", "*", "root"))


def assert_access_error(response: httpx.Response, code: int) -> None:
    status = {4001: 401, 4002: 401, 4003: 404, 4004: 403, 4005: 403}[code]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code", "message"}
    assert body["code"] == code


def assert_error(response: httpx.Response, status: int, name: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == name
    assert set(body) == {"error", "message"}
    return str(body["message"])


async def until(condition: Any, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.01)


# -- public links and what a viewer sees -------------------------------------------------------------


async def test_public_link_info_verify_and_poll(env: Env) -> None:
    link = await env.create()
    info = await env.client.get(f"{PUBLIC}/{link['uuid']}")
    assert info.json() == {"access_mode": "public", "status": "active", "display_name": "Your delivery"}

    response = await env.client.post(f"{PUBLIC}/{link['uuid']}/verify")  # no body at all
    assert response.status_code == 200, response.text
    grant = response.json()
    assert set(grant) == {"session_token", "expires_at", "channel", "ws_url", "app_key"}
    assert grant["channel"] == f"private-tracking-link.{link['uuid']}"
    assert grant["ws_url"] == f"ws://127.0.0.1:{env.system.relay.ws_port}"
    assert grant["app_key"] == "fleetgate"
    assert datetime.fromisoformat(grant["expires_at"]) == env.clock.now + timedelta(hours=4)

    assert (await env.poll(link["uuid"], grant["session_token"])).status_code == 204  # nothing reported yet
    await env.system.publish([position("truck-7", "acme", lat=52.52, lng=13.405)])
    located = await env.poll(link["uuid"], grant["session_token"])
    assert located.status_code == 200
    assert located.json()["display_name"] == "Your delivery"
    assert located.json()["address"] == "Berlin, Germany"


async def test_session_tokens_are_long_random_and_stored_only_hashed(env: Env, tmp_path: Path) -> None:
    link = await env.create()
    tokens = {await env.session(link["uuid"]) for _ in range(3)}
    assert len(tokens) == 3
    for tok in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", tok)  # >= 256 bits as URL-safe base64
        assert await env.store.get_session(tok) is None
        stored = await env.store.get_session(model.token_hash(tok))
        assert stored is not None and stored.token_hash != tok and stored.link_uuid == link["uuid"]
    files = b"".join(p.read_bytes() for p in tmp_path.glob("links.sqlite*"))
    assert files and not any(tok.encode() in files for tok in tokens)


async def test_polling_returns_the_websocket_payload(env: Env) -> None:
    link = await env.create(arrival={"lat": 52.60, "lng": 13.50, "radius_m": 200})
    session = await env.session(link["uuid"])
    record = position("truck-7", "acme", lat=52.52, lng=13.405)
    await env.system.publish([record])
    stored = await env.links.link(link["uuid"])
    assert stored is not None
    expected = await env.links.public_location(stored)
    assert expected is not None and expected.distance_km is not None
    response = await env.poll(link["uuid"], session)
    assert response.json() == msgspec.to_builtins(expected)
    assert set(response.json()) <= set(model.PublicLocation.__struct_fields__)
    assert response.headers["content-type"].startswith("application/json")


async def test_eta_from_the_recent_moving_speed(env: Env) -> None:
    link = await env.create(arrival={"lat": 52.60, "lng": 13.50})
    session = await env.session(link["uuid"])
    now = env.clock.now.timestamp()
    await env.system.publish([position("truck-7", "acme", lat=52.50, lng=13.40, t=now - 10)])  # 42 km/h, moving

    async def has_eta() -> bool:
        return "eta_minutes" in (await env.poll(link["uuid"], session)).json()

    await until(has_eta)  # the relay's feed has given the record to the speed tracker
    body = (await env.poll(link["uuid"], session)).json()
    assert body["eta_minutes"] == pytest.approx(body["distance_km"] / 42.0 * 60, abs=0.1)


async def test_public_responses_never_reveal_internal_identifiers(env: Env) -> None:
    secrets_ = ["356938035643809", "asset-secret-7", "company-secret", "Truck internal", "job-secret-9"]
    headers = bearer(token("office", "company-secret", "o"))
    link = await env.create(headers, asset_id="asset-secret-7", job_id="job-secret-9", arrival={"lat": 0, "lng": 0})
    record = msgspec.structs.replace(
        position("asset-secret-7", "company-secret", imei="356938035643809"), display_name="Truck internal"
    )
    await env.system.publish([record])
    uuid = link["uuid"]
    responses = [await env.client.get(f"{PUBLIC}/{uuid}"), await env.verify(uuid)]
    session = responses[-1].json()["session_token"]
    responses += [
        await env.poll(uuid, session),
        await env.poll(uuid, "x" * 43),
        await env.verify(uuid, {"email": JANE}),
        await env.client.get(f"{PUBLIC}/{uuid}/location"),
        await env.client.options(f"{PUBLIC}/{uuid}/verify"),
    ]
    await env.client.patch(f"/api/tracking-links/{uuid}", headers=headers, json={"enabled": False})
    responses += [await env.poll(uuid, session), await env.client.get(f"{PUBLIC}/{uuid}"), await env.verify(uuid)]
    assert responses[2].status_code == 200 and responses[2].json()["lat"] == 52.0
    for response in responses:
        seen = response.text + str(response.headers)
        assert not [s for s in secrets_ if s in seen], (response.request.url, seen)


async def test_another_companys_positions_are_never_shown(env: Env) -> None:
    link = await env.create(asset_id="shared-id")
    session = await env.session(link["uuid"])
    await env.system.publish([position("shared-id", "globex")])  # same asset id, another company's record
    assert (await env.poll(link["uuid"], session)).status_code == 204


async def test_public_endpoints_answer_any_origin(env: Env) -> None:
    link = await env.create()
    preflight = await env.client.options(
        f"{PUBLIC}/{link['uuid']}/location",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 204
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    for response in [preflight, await env.client.get(f"{PUBLIC}/{link['uuid']}"), await env.poll(link["uuid"], "x")]:
        assert response.headers["access-control-allow-origin"] == "*"


# -- access modes -----------------------------------------------------------------------------------


async def test_public_mode_takes_no_credentials(env: Env) -> None:
    link = await env.create()
    assert_error(await env.verify(link["uuid"], {"email": JANE}), 400, "BadRequest")
    assert_error(await env.verify(link["uuid"], {"nonsense": 1}), 400, "BadRequest")
    assert (await env.verify(link["uuid"], {})).status_code == 200


async def test_email_mode_records_the_address(env: Env) -> None:
    link = await env.create(access_mode="email")
    assert (await env.client.get(f"{PUBLIC}/{link['uuid']}")).json()["access_mode"] == "email"
    assert_error(await env.verify(link["uuid"]), 400, "BadRequest")
    for bad in ["jane", "jane@", "jane@example", "ja ne@example.com", "jane@example.com\r\nBcc: x@y.z"]:
        assert_error(await env.verify(link["uuid"], {"email": bad}), 400, "BadRequest")
    assert_error(await env.verify(link["uuid"], {"email": JANE, "code": "123456"}), 400, "BadRequest")
    session = await env.session(link["uuid"], {"email": " Jane@Example.COM "})
    stored = await env.store.get_session(model.token_hash(session))
    assert stored is not None and stored.email == JANE
    assert env.inbox.mails == []


async def test_email_code_in_two_steps(env: Env) -> None:
    link = await env.create(access_mode="email_code", display_name="Delivery 42")
    step1 = await env.verify(link["uuid"], {"email": JANE})
    assert step1.status_code == 202 and step1.json() == {"code_sent": True}
    code = await env.inbox.code_for(JANE)
    assert env.inbox.to(JANE)[-1]["Subject"] == "Your code for Delivery 42"
    pending = await env.store.get_code(link["uuid"], JANE)
    assert pending is not None and code not in pending.code_hash  # stored as a keyed hash only
    session = await env.session(link["uuid"], {"email": "JANE@example.com", "code": code})
    assert (await env.poll(link["uuid"], session)).status_code == 204
    # Used up: the same code does not open a second session.
    assert_error(await env.verify(link["uuid"], {"email": JANE, "code": code}), 403, "InvalidCode")


async def test_five_wrong_codes_void_the_code(env: Env) -> None:
    link = await env.create(access_mode="email_code")
    await env.verify(link["uuid"], {"email": JANE})
    code = await env.inbox.code_for(JANE)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        assert_error(await env.verify(link["uuid"], {"email": JANE, "code": wrong}), 403, "InvalidCode")
    assert_error(await env.verify(link["uuid"], {"email": JANE, "code": code}), 403, "InvalidCode")
    assert await env.store.get_code(link["uuid"], JANE) is None


async def test_four_wrong_codes_leave_the_right_one_working(env: Env) -> None:
    link = await env.create(access_mode="email_code")
    await env.verify(link["uuid"], {"email": JANE})
    code = await env.inbox.code_for(JANE)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(4):
        assert_error(await env.verify(link["uuid"], {"email": JANE, "code": wrong}), 403, "InvalidCode")
    assert (await env.verify(link["uuid"], {"email": JANE, "code": code})).status_code == 200


async def test_a_code_expires_after_ten_minutes(env: Env) -> None:
    link = await env.create(access_mode="email_code")
    await env.verify(link["uuid"], {"email": JANE})
    code = await env.inbox.code_for(JANE)
    env.clock.advance(10 * 60 + 1)
    assert_error(await env.verify(link["uuid"], {"email": JANE, "code": code}), 403, "InvalidCode")


async def test_a_malformed_code_is_a_bad_request(env: Env) -> None:
    link = await env.create(access_mode="email_code")
    for bad in ["12345", "1234567", "abcdef", ""]:
        assert_error(await env.verify(link["uuid"], {"email": JANE, "code": bad}), 400, "BadRequest")


async def test_authorized_only_answers_alike_for_listed_and_unlisted(env: Env) -> None:
    link = await env.create(access_mode="authorized_only", allowed_emails=["Jane@Example.com", "joe@example.com"])
    assert link["allowed_emails"] == [JANE, "joe@example.com"]
    listed = await env.verify(link["uuid"], {"email": JANE})
    unlisted = await env.verify(link["uuid"], {"email": "mallory@example.com"})

    def shown(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
        return response.status_code, response.content, {k: v for k, v in response.headers.items() if k != "date"}

    assert shown(listed) == shown(unlisted)
    assert listed.status_code == 202 and listed.json() == {"code_sent": True}
    code = await env.inbox.code_for(JANE)
    await asyncio.sleep(0.2)  # time enough for a mail to the unlisted address, were one sent
    assert [rcpt for rcpt, _ in env.inbox.mails] == [[JANE]]
    # A guessed code: the same answer whether the address is listed (wrong code) or not (no code at all).
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    refused = [await env.verify(link["uuid"], {"email": e, "code": wrong}) for e in (JANE, "mallory@example.com")]
    assert shown(refused[0]) == shown(refused[1])
    session = await env.session(link["uuid"], {"email": JANE, "code": code})
    assert (await env.store.get_session(model.token_hash(session))) is not None


async def test_without_smtp_the_code_goes_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.links.mail")
    async with (
        running_system(tmp_path, rest=True, links=LinkSettings()) as system,
        httpx.AsyncClient(base_url=system.rest_url) as client,
    ):
        body = {"asset_id": "truck-7", "display_name": "Demo", "access_mode": "email_code"}
        uuid = (await client.post("/api/tracking-links", headers=ACME, json=body)).json()["uuid"]
        assert (await client.post(f"{PUBLIC}/{uuid}/verify", json={"email": JANE})).status_code == 202
        found = re.search(r"verification code for jane@example.com: (\d{6})", caplog.text)
        assert found is not None
        response = await client.post(f"{PUBLIC}/{uuid}/verify", json={"email": JANE, "code": found.group(1)})
        assert response.status_code == 200


async def test_an_unreachable_mail_server_is_503(tmp_path: Path) -> None:
    links = link_settings(free_port())  # nothing listens there
    async with (
        running_system(tmp_path, rest=True, links=links) as system,
        httpx.AsyncClient(base_url=system.rest_url) as client,
    ):
        body = {"asset_id": "truck-7", "display_name": "Demo", "access_mode": "email_code"}
        uuid = (await client.post("/api/tracking-links", headers=ACME, json=body)).json()["uuid"]
        response = await client.post(f"{PUBLIC}/{uuid}/verify", json={"email": JANE})
        assert_error(response, 503, "Unavailable")
        assert "127.0.0.1" not in response.text


# -- sessions and link states -----------------------------------------------------------------------


async def test_a_session_opens_only_its_own_link(env: Env) -> None:
    first, second = await env.create(), await env.create()
    session = await env.session(first["uuid"])
    assert_access_error(await env.poll(second["uuid"], session), 4001)
    assert (await env.poll(first["uuid"], session)).status_code == 204


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer short"}, {"Authorization": "Bearer " + "A" * 43}],
    ids=["missing", "basic", "malformed", "unknown"],
)
async def test_polling_without_a_valid_session_is_4001(env: Env, headers: dict[str, str]) -> None:
    link = await env.create()
    response = await env.client.get(f"{PUBLIC}/{link['uuid']}/location", headers=headers)
    assert_access_error(response, 4001)
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_the_session_token_is_not_taken_from_the_url(env: Env) -> None:
    link = await env.create()
    session = await env.session(link["uuid"])
    response = await env.client.get(f"{PUBLIC}/{link['uuid']}/location", params={"session": session})
    assert_access_error(response, 4001)


async def test_a_session_expires_after_the_links_session_ttl(env: Env) -> None:
    link = await env.create(session_ttl_s=60)
    session = await env.session(link["uuid"])
    env.clock.advance(59)
    assert (await env.poll(link["uuid"], session)).status_code == 204
    env.clock.advance(2)
    assert_access_error(await env.poll(link["uuid"], session), 4002)


async def test_a_deleted_link_is_4003(env: Env) -> None:
    link = await env.create()
    session = await env.session(link["uuid"])
    assert (await env.client.delete(f"/api/tracking-links/{link['uuid']}", headers=ACME)).status_code == 204
    assert_access_error(await env.poll(link["uuid"], session), 4003)
    assert_access_error(await env.client.get(f"{PUBLIC}/{link['uuid']}"), 4003)
    assert_access_error(await env.verify(link["uuid"]), 4003)
    assert await env.store.get_session(model.token_hash(session)) is None
    assert_access_error(await env.client.get(f"{PUBLIC}/not-a-uuid"), 4003)


async def test_a_disabled_link_is_4004_and_its_sessions_end(env: Env) -> None:
    link = await env.create()
    session = await env.session(link["uuid"])
    response = await env.client.patch(f"/api/tracking-links/{link['uuid']}", headers=ACME, json={"enabled": False})
    assert response.json()["status"] == "disabled"
    assert await env.store.get_session(model.token_hash(session)) is None
    assert_access_error(await env.poll(link["uuid"], session), 4004)
    assert_access_error(await env.verify(link["uuid"]), 4004)
    assert (await env.client.get(f"{PUBLIC}/{link['uuid']}")).json()["status"] == "disabled"
    # Enabled again, it takes new sessions; the old one stays ended.
    await env.client.patch(f"/api/tracking-links/{link['uuid']}", headers=ACME, json={"enabled": True})
    assert (await env.poll(link["uuid"], await env.session(link["uuid"]))).status_code == 204
    assert_access_error(await env.poll(link["uuid"], session), 4001)


async def test_an_expired_link_is_4004(env: Env) -> None:
    link = await env.create(expires_at=(env.clock.now + timedelta(hours=1)).isoformat())
    session = await env.session(link["uuid"])
    env.clock.advance(3600)
    assert_access_error(await env.poll(link["uuid"], session), 4004)
    assert_access_error(await env.verify(link["uuid"]), 4004)
    assert (await env.client.get(f"{PUBLIC}/{link['uuid']}")).json()["status"] == "expired"
    # Moving the expiry revives it.
    later = (env.clock.now + timedelta(hours=1)).isoformat()
    await env.client.patch(f"/api/tracking-links/{link['uuid']}", headers=ACME, json={"expires_at": later})
    assert (await env.poll(link["uuid"], session)).status_code == 204


async def test_outside_the_schedule_is_4005(env: Env) -> None:
    today = env.clock.now.weekday()
    schedule = {"timezone": "UTC", "windows": [{"days": [(today + 2) % 7], "start": "00:00", "end": "24:00"}]}
    link = await env.create(schedule=schedule, session_ttl_s=2 * 24 * 3600)
    info = (await env.client.get(f"{PUBLIC}/{link['uuid']}")).json()
    assert info["status"] == "outside_schedule"
    opens = datetime.combine(env.clock.now.date() + timedelta(days=2), datetime.min.time(), UTC)
    assert datetime.fromisoformat(info["next_change"]) == opens
    assert_access_error(await env.verify(link["uuid"]), 4005)

    env.clock.now = opens + timedelta(hours=1)
    session = await env.session(link["uuid"])
    assert (await env.poll(link["uuid"], session)).status_code == 204
    env.clock.now = opens + timedelta(days=1, minutes=1)  # the window closed; the session is still valid
    assert_access_error(await env.poll(link["uuid"], session), 4005)


async def test_arrival_expires_the_link(env: Env) -> None:
    link = await env.create(arrival={"lat": 52.52, "lng": 13.405, "radius_m": 300})
    session = await env.session(link["uuid"])
    fix = env.clock.now.timestamp() + 1
    # Into the last positions only: the relay's feed, whose arrival watch would race this poll, never sees it.
    await env.system.gateway.store.save_last_positions([position("truck-7", "acme", lat=52.521, lng=13.405, t=fix)])
    arrived = await env.poll(link["uuid"], session)
    assert arrived.status_code == 200 and arrived.json()["distance_km"] == pytest.approx(0.11, abs=0.01)
    assert_access_error(await env.poll(link["uuid"], session), 4004)
    assert (await env.client.get(f"{PUBLIC}/{link['uuid']}")).json()["status"] == "expired"
    stored = await env.links.link(link["uuid"])
    assert stored is not None and stored.expired_reason == "arrival"
    await until(lambda: _true(env.events(link["uuid"]) == ["created", "expired"]))


async def test_a_position_from_before_the_link_does_not_count_as_arrival(env: Env) -> None:
    link = await env.create(arrival={"lat": 52.52, "lng": 13.405})
    session = await env.session(link["uuid"])
    await env.system.publish([position("truck-7", "acme", lat=52.52, lng=13.405, t=env.clock.now.timestamp() - 60)])
    assert (await env.poll(link["uuid"], session)).status_code == 200
    assert (await env.poll(link["uuid"], session)).status_code == 200  # still active


async def _true(value: bool) -> bool:
    return value


# -- management API ---------------------------------------------------------------------------------


async def test_create_get_list_patch_delete(env: Env) -> None:
    expires = (env.clock.now + timedelta(days=1)).replace(microsecond=0)
    created = await env.create(
        job_id="job-1",
        access_mode="email",
        expires_at=expires.isoformat(),
        arrival={"lat": 52.5, "lng": 13.4, "radius_m": 100},
        schedule={"timezone": "Europe/Berlin", "windows": [{"days": EVERY_DAY, "start": "00:00", "end": "24:00"}]},
        session_ttl_s=600,
    )
    uuid = created["uuid"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid)
    assert created == {
        "uuid": uuid,
        "company_id": "acme",
        "asset_id": "truck-7",
        "job_id": "job-1",
        "display_name": "Your delivery",
        "access_mode": "email",
        "allowed_emails": [],
        "expires_at": expires.isoformat().replace("+00:00", "Z"),
        "arrival": {"lat": 52.5, "lng": 13.4, "radius_m": 100.0},
        "schedule": {
            "timezone": "Europe/Berlin",
            "windows": [{"days": EVERY_DAY, "start": "00:00", "end": "24:00"}],
        },
        "session_ttl_s": 600,
        "enabled": True,
        "created_at": created["created_at"],
        "updated_at": created["created_at"],
        "expired_at": None,
        "expired_reason": None,
        "status": "active",
        "public_url": f"{PUBLIC}/{uuid}",
    }
    assert (await env.client.get(f"/api/tracking-links/{uuid}", headers=ACME)).json() == created
    env.clock.advance(1)
    second = await env.create(display_name="Another")
    listed = (await env.client.get("/api/tracking-links", headers=ACME)).json()["links"]
    assert [link["uuid"] for link in listed] == [second["uuid"], uuid]  # newest first

    env.clock.advance(5)
    response = await env.client.patch(
        f"/api/tracking-links/{uuid}", headers=ACME, json={"display_name": " Parcel ", "arrival": None}
    )
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["display_name"] == "Parcel" and patched["arrival"] is None
    assert patched["job_id"] == "job-1" and patched["session_ttl_s"] == 600  # untouched
    assert patched["updated_at"] != created["updated_at"]
    assert (await env.links.link(uuid)) == msgspec.convert(
        {k: v for k, v in patched.items() if k not in ("status", "public_url") and v is not None},
        model.TrackingLink,
    )
    assert env.events(uuid) == ["created", "updated"]

    assert (await env.client.delete(f"/api/tracking-links/{uuid}", headers=ACME)).status_code == 204
    assert_error(await env.client.get(f"/api/tracking-links/{uuid}", headers=ACME), 404, "NotFound")
    assert_error(await env.client.delete(f"/api/tracking-links/{uuid}", headers=ACME), 404, "NotFound")
    assert await env.store.get_link(uuid) is None


async def test_links_are_scoped_to_the_company(env: Env) -> None:
    acme_link = await env.create()
    globex_link = await env.create(GLOBEX)
    uuid = acme_link["uuid"]
    assert_error(await env.client.get(f"/api/tracking-links/{uuid}", headers=GLOBEX), 404, "NotFound")
    assert_error(
        await env.client.patch(f"/api/tracking-links/{uuid}", headers=GLOBEX, json={"enabled": False}), 404, "NotFound"
    )
    assert_error(await env.client.delete(f"/api/tracking-links/{uuid}", headers=GLOBEX), 404, "NotFound")
    assert (await env.links.link(uuid)) is not None and env.events(uuid) == ["created"]
    listed = (await env.client.get("/api/tracking-links", headers=GLOBEX)).json()["links"]
    assert [link["uuid"] for link in listed] == [globex_link["uuid"]]
    assert_error(await env.client.get("/api/tracking-links?company=acme", headers=GLOBEX), 403, "Forbidden")
    response = await env.client.post(
        "/api/tracking-links", headers=GLOBEX, json={"asset_id": "a", "display_name": "x", "company_id": "acme"}
    )
    assert_error(response, 403, "Forbidden")


async def test_a_platform_admin_names_the_company(env: Env) -> None:
    body = {"asset_id": "truck-7", "display_name": "x"}
    assert_error(await env.client.post("/api/tracking-links", headers=ROOT, json=body), 400, "BadRequest")
    assert_error(await env.client.get("/api/tracking-links", headers=ROOT), 400, "BadRequest")
    created = await env.create(ROOT, company_id="acme")
    assert created["company_id"] == "acme"
    listed = (await env.client.get("/api/tracking-links?company=acme", headers=ROOT)).json()["links"]
    assert [link["uuid"] for link in listed] == [created["uuid"]]
    response = await env.client.patch(f"/api/tracking-links/{created['uuid']}", headers=ROOT, json={"enabled": False})
    assert response.json()["enabled"] is False
    # Only an admin token acts for every company.
    office_star = bearer(token("office", "*", "o"))
    assert_error(await env.client.get("/api/tracking-links", headers=office_star), 403, "Forbidden")


async def test_company_admin_tokens_manage_their_company(env: Env) -> None:
    created = await env.create(ACME_ADMIN)
    assert (await env.client.get(f"/api/tracking-links/{created['uuid']}", headers=ACME)).status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not.a.jwt"}, 401),
        (bearer(token("office", "acme", "late", ttl_s=60, now=time.time() - 3600)), 401),
        (bearer(token("driver", "acme", "driver-1")), 403),
    ],
    ids=["missing", "malformed", "expired", "driver"],
)
async def test_management_needs_an_office_or_admin_token(env: Env, headers: dict[str, str], status: int) -> None:
    assert (await env.client.get("/api/tracking-links", headers=headers)).status_code == status
    response = await env.client.post("/api/tracking-links", headers=headers, content=b"{garbage")
    assert response.status_code == status  # refused before the body is read
    assert (await env.client.get("/api/tracking-links", headers=ACME)).json()["links"] == []


async def test_a_revoked_token_is_refused(env: Env) -> None:
    tok = token("office", "acme", "leaver")
    assert (await env.client.get("/api/tracking-links", headers=bearer(tok))).status_code == 200
    claims = env.system.relay.verifier.verify(tok)
    await env.system.control.revoke(claims.jti, claims.exp)
    assert "revoked" in assert_error(
        await env.client.get("/api/tracking-links", headers=bearer(tok)), 401, "Unauthorized"
    )


def _window(start: str, end: str, days: list[int] | None = None) -> dict[str, Any]:
    return {"timezone": "UTC", "windows": [{"days": [0] if days is None else days, "start": start, "end": end}]}


@pytest.mark.parametrize(
    "body",
    [
        {"display_name": "x"},
        {"asset_id": "a"},
        {"asset_id": " ", "display_name": "x"},
        {"asset_id": "a", "display_name": "  "},
        {"asset_id": "a", "display_name": "x", "colour": "red"},
        {"asset_id": "a", "display_name": "x", "access_mode": "secret"},
        {"asset_id": "a", "display_name": "x", "access_mode": "authorized_only"},
        {"asset_id": "a", "display_name": "x", "access_mode": "authorized_only", "allowed_emails": ["nope"]},
        {"asset_id": "a", "display_name": "x", "expires_at": "2020-01-01T00:00:00Z"},
        {"asset_id": "a", "display_name": "x", "expires_at": "2999-01-01T00:00:00"},
        {"asset_id": "a", "display_name": "x", "arrival": {"lat": 91, "lng": 0}},
        {"asset_id": "a", "display_name": "x", "arrival": {"lat": 0, "lng": 0, "radius_m": 0}},
        {"asset_id": "a", "display_name": "x", "schedule": {"timezone": "Mars/Olympus", "windows": []}},
        {"asset_id": "a", "display_name": "x", "schedule": {"timezone": "UTC", "windows": []}},
        {"asset_id": "a", "display_name": "x", "schedule": _window("18:00", "08:00")},
        {"asset_id": "a", "display_name": "x", "schedule": _window("08:00", "08:00")},
        {"asset_id": "a", "display_name": "x", "schedule": _window("8:00", "18:00")},
        {"asset_id": "a", "display_name": "x", "schedule": _window("08:00", "09:00", days=[7])},
        {"asset_id": "a", "display_name": "x", "schedule": _window("08:00", "09:00", days=[])},
        {"asset_id": "a", "display_name": "x", "session_ttl_s": 59},
        {"asset_id": "a", "display_name": "x", "session_ttl_s": 7 * 24 * 3600 + 1},
    ],
)
async def test_invalid_links_are_refused(env: Env, body: dict[str, Any]) -> None:
    assert_error(await env.client.post("/api/tracking-links", headers=ACME, json=body), 400, "BadRequest")
    assert (await env.client.get("/api/tracking-links", headers=ACME)).json()["links"] == []


async def test_invalid_patches_are_refused_and_change_nothing(env: Env) -> None:
    link = await env.create()
    url = f"/api/tracking-links/{link['uuid']}"
    for body in [
        {"access_mode": "authorized_only"},
        {"display_name": None},
        {"uuid": "another"},
        {"company_id": "globex"},
        {"schedule": _window("10:00", "09:00")},
    ]:
        assert_error(await env.client.patch(url, headers=ACME, json=body), 400, "BadRequest")
    assert (await env.client.get(url, headers=ACME)).json() == {**link, "status": "active"}
    assert env.events(link["uuid"]) == ["created"]


async def test_an_asset_of_another_company_is_refused(env: Env) -> None:
    await env.system.publish([position("globex-truck", "globex")])
    response = await env.client.post(
        "/api/tracking-links", headers=ACME, json={"asset_id": "globex-truck", "display_name": "x"}
    )
    assert_error(response, 400, "BadRequest")
    # An asset that has not reported yet is fine (its first position will say whose it is).
    assert (await env.create(asset_id="brand-new"))["asset_id"] == "brand-new"


async def test_reassigning_the_vehicle_tells_every_instance(env: Env) -> None:
    link = await env.create(job_id="route-12")
    session = await env.session(link["uuid"])
    response = await env.client.patch(f"/api/tracking-links/{link['uuid']}", headers=ACME, json={"asset_id": "van-3"})
    assert response.json()["asset_id"] == "van-3"
    await until(lambda: _true(len(env.events(link["uuid"])) == 3))
    created, changed, updated = [h for h in env.hints if h.kind == "link_changed"]
    assert created.data == {"uuid": link["uuid"], "event": "created", "asset_id": "truck-7"}
    assert changed.data == {
        "uuid": link["uuid"],
        "event": "vehicle_changed",
        "asset_id": "van-3",
        "previous_asset_id": "truck-7",
    }
    assert updated.data["event"] == "updated" and updated.data["asset_id"] == "van-3"
    # The viewer keeps its session and now sees the other vehicle.
    await env.system.publish([position("van-3", "acme", lat=48.0, lng=11.0)])
    assert (await env.poll(link["uuid"], session)).json()["lat"] == 48.0


async def test_disabling_and_deleting_announce_and_end_sessions(env: Env) -> None:
    link = await env.create()
    uuid = link["uuid"]
    await env.client.patch(f"/api/tracking-links/{uuid}", headers=ACME, json={"enabled": False})
    await env.client.delete(f"/api/tracking-links/{uuid}", headers=ACME)
    await until(lambda: _true(len(env.events(uuid)) == 4))
    assert [(h.data["event"], h.data.get("sessions_ended")) for h in env.hints if h.kind == "link_changed"] == [
        ("created", None),
        ("disabled", True),
        ("updated", True),
        ("deleted", True),
    ]
    assert all(h.data["asset_id"] == "truck-7" for h in env.hints if h.kind == "link_changed")


async def test_tightening_access_ends_the_sessions(env: Env) -> None:
    link = await env.create()
    session = await env.session(link["uuid"])
    body = {"access_mode": "authorized_only", "allowed_emails": [JANE]}
    assert (await env.client.patch(f"/api/tracking-links/{link['uuid']}", headers=ACME, json=body)).status_code == 200
    assert_access_error(await env.poll(link["uuid"], session), 4001)
    await until(lambda: _true(len(env.events(link["uuid"])) == 2))
    assert [h.data.get("sessions_ended") for h in env.hints if h.kind == "link_changed"] == [None, True]


async def test_mark_expired_is_idempotent_and_announced(env: Env) -> None:
    created = await env.create()
    link = await env.links.link(created["uuid"])
    assert link is not None
    expired = await env.links.mark_expired(link, "time")
    assert expired.expired_reason == "time" and env.links.status(expired) == "expired"
    assert await env.links.mark_expired(link, "arrival") == expired  # already marked: as stored
    await until(lambda: _true(env.events(link.uuid) == ["created", "expired"]))
    with pytest.raises(ValueError):
        await env.links.mark_expired(link, "boredom")


async def test_openapi_lists_the_link_endpoints(env: Env) -> None:
    paths = (await env.client.get("/schema/openapi.json")).json()["paths"]
    assert set(paths["/api/tracking-links"]) >= {"get", "post"}
    assert set(paths["/api/tracking-links/{uuid}"]) >= {"get", "patch", "delete"}
    assert "get" in paths[f"{PUBLIC}/{{uuid}}"]
    assert "post" in paths[f"{PUBLIC}/{{uuid}}/verify"]
    assert "get" in paths[f"{PUBLIC}/{{uuid}}/location"]


# -- limits -----------------------------------------------------------------------------------------


async def test_the_31st_verify_in_a_minute_is_429(env: Env) -> None:
    link = await env.create()
    for _ in range(15):
        assert (await env.verify(link["uuid"])).status_code == 200
    for _ in range(15):  # malformed attempts count too
        assert (await env.client.post(f"{PUBLIC}/{link['uuid']}/verify", content=b"{")).status_code == 400
    response = await env.verify(link["uuid"])
    assert_error(response, 429, "TooManyRequests")
    assert 55 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["access-control-expose-headers"] == "Retry-After"
    other = await env.create()
    assert (await env.verify(other["uuid"])).status_code == 429  # per client address, whatever the link


async def test_the_61st_poll_of_a_session_in_a_minute_is_429(env: Env) -> None:
    link = await env.create()
    session, other = await env.session(link["uuid"]), await env.session(link["uuid"])
    for _ in range(60):
        assert (await env.poll(link["uuid"], session)).status_code == 204
    response = await env.poll(link["uuid"], session)
    assert_error(response, 429, "TooManyRequests")
    assert 55 <= int(response.headers["retry-after"]) <= 60
    assert (await env.poll(link["uuid"], other)).status_code == 204  # per session


async def test_limits_are_settings(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    links = link_settings(smtp[1], verify_per_minute_per_ip=2, poll_per_minute_per_session=1)
    async with (
        running_system(tmp_path, rest=True, links=links) as system,
        httpx.AsyncClient(base_url=system.rest_url) as client,
    ):
        body = {"asset_id": "truck-7", "display_name": "Demo"}
        uuid = (await client.post("/api/tracking-links", headers=ACME, json=body)).json()["uuid"]
        session = (await client.post(f"{PUBLIC}/{uuid}/verify")).json()["session_token"]
        assert (await client.post(f"{PUBLIC}/{uuid}/verify")).status_code == 200
        assert (await client.post(f"{PUBLIC}/{uuid}/verify")).status_code == 429
        location = f"{PUBLIC}/{uuid}/location"
        assert (await client.get(location, headers=bearer(session))).status_code == 204
        assert (await client.get(location, headers=bearer(session))).status_code == 429
