"""The REST service over a real uvicorn socket, a real SQLite state store and the memory control driver."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.records import Device
from gateway.settings import StateSettings
from gateway.state import StateStore, open_state
from relay.control import MemoryControl
from relay.rest import RestContext, create_app, start_rest
from relay.settings import AuthSettings, RelaySettings
from relay.tokens import TokenVerifier, mint_token

# HS256 secrets shorter than 32 bytes are refused by the verifier (brute-forceable).
AUTH = AuthSettings(secret="test-secret-of-the-rest-api-tests-0123456789")
OTHER_AUTH = AuthSettings(secret="another-secret-nobody-here-trusts-0123456789")
SETTINGS = RelaySettings(max_connections_per_company=500, company_limits={"acme": 50, "globex": 70})

IMEI_A = "356938035643809"
IMEI_B = "490154203237518"


@dataclass
class Env:
    client: httpx.AsyncClient
    store: StateStore
    control: MemoryControl
    verifier: TokenVerifier
    health: dict[str, Any]
    port: int


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = open_state(StateSettings(sqlite_path=str(tmp_path / "state.sqlite")))
    control = MemoryControl()
    await control.start()
    verifier = TokenVerifier(AUTH)
    health: dict[str, Any] = {"status": "ok", "bus": "memory"}
    ctx = RestContext(store=store, control=control, verifier=verifier, settings=SETTINGS, health=lambda: health)
    server = await start_rest(create_app(ctx), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5.0) as client:
            yield Env(client, store, control, verifier, health, server.port)
    finally:
        await server.stop()
        await control.close()
        await store.close()


def token(role: str = "admin", company: str = "*", **kwargs: Any) -> str:
    return mint_token(AUTH, role=role, company=company, user=f"{role}-1", ttl_s=3600, **kwargs)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


ROOT = bearer(token())  # platform operator: company "*"
ACME = bearer(token(company="acme"))  # admin of one company


def device_body(company: str = "acme", **extra: Any) -> dict[str, Any]:
    return {"asset_id": "truck-7", "company_id": company, **extra}


def assert_error(response: httpx.Response, status: int, name: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == name
    assert set(body) == {"error", "message"}
    return str(body["message"])


# -- serving --------------------------------------------------------------------------------------


async def test_uvicorn_leaves_the_host_signal_handlers_alone(tmp_path: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    store = open_state(StateSettings(sqlite_path=str(tmp_path / "s.sqlite")))
    ctx = RestContext(store, MemoryControl(), TokenVerifier(AUTH), SETTINGS, lambda: {"status": "ok"})
    server = await start_rest(create_app(ctx), "127.0.0.1", 0)
    try:
        assert {sig: signal.getsignal(sig) for sig in before} == before
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        await server.stop()
        await store.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_stop_closes_the_port_and_a_busy_port_raises_oserror(tmp_path: Path) -> None:
    store = open_state(StateSettings(sqlite_path=str(tmp_path / "s.sqlite")))
    app = create_app(RestContext(store, MemoryControl(), TokenVerifier(AUTH), SETTINGS, lambda: {"status": "ok"}))
    server = await start_rest(app, "127.0.0.1", 0)
    with pytest.raises(OSError):
        await start_rest(app, "127.0.0.1", server.port)
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
        pass
    await store.close()


# -- operations -------------------------------------------------------------------------------------


async def test_healthz_follows_the_health_report(env: Env) -> None:
    response = await env.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "bus": "memory"}
    env.health["status"] = "degraded"
    response = await env.client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"


async def test_healthz_never_leaks_a_failing_check(tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("redis://:hunter2@db")

    store = open_state(StateSettings(sqlite_path=str(tmp_path / "s.sqlite")))
    server = await start_rest(
        create_app(RestContext(store, MemoryControl(), TokenVerifier(AUTH), SETTINGS, broken)), "127.0.0.1", 0
    )
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
        assert response.status_code == 503
        assert "hunter2" not in response.text
        assert response.json() == {"status": "error"}
    finally:
        await server.stop()
        await store.close()


async def test_metrics_in_prometheus_text_format(env: Env) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    response = await env.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert names and all(name.startswith("fleetgate_") for name in names)


async def test_openapi_schema_lists_the_admin_api(env: Env) -> None:
    response = await env.client.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "fleetgate"
    paths = schema["paths"]
    assert set(paths["/api/admin/devices/{imei}"]) >= {"get", "put", "delete"}
    assert set(paths["/api/admin/devices"]) >= {"get", "post"}
    assert "get" in paths["/api/admin/limits"]
    assert set(paths["/api/admin/companies/{company}/limit"]) >= {"put", "delete"}
    assert "post" in paths["/api/admin/revocations"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_unknown_path_is_a_json_404(env: Env) -> None:
    assert_error(await env.client.get("/nope"), 404, "NotFound")


# -- authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not.a.jwt"},
        bearer(mint_token(OTHER_AUTH, role="admin", company="*", user="mallory", ttl_s=300)),
        bearer(mint_token(AUTH, role="admin", company="*", user="late", ttl_s=60, now=time.time() - 3600)),
    ],
    ids=["missing", "basic", "empty", "malformed", "foreign-signature", "expired"],
)
async def test_admin_api_refuses_without_a_valid_token(env: Env, headers: dict[str, str]) -> None:
    response = await env.client.get("/api/admin/devices", headers=headers)
    assert_error(response, 401, "Unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_expired_token_says_so(env: Env) -> None:
    late = mint_token(AUTH, role="admin", company="*", user="late", ttl_s=60, now=time.time() - 3600)
    assert "expired" in assert_error(
        await env.client.get("/api/admin/limits", headers=bearer(late)), 401, "Unauthorized"
    )


async def test_revoked_admin_token_is_refused(env: Env) -> None:
    tok = token()
    assert (await env.client.get("/api/admin/devices", headers=bearer(tok))).status_code == 200
    claims = env.verifier.verify(tok)
    await env.control.revoke(claims.jti, claims.exp)
    message = assert_error(await env.client.get("/api/admin/devices", headers=bearer(tok)), 401, "Unauthorized")
    assert "revoked" in message


@pytest.mark.parametrize("role", ["office", "driver"])
async def test_non_admin_token_is_forbidden_before_the_body_is_read(env: Env, role: str) -> None:
    headers = bearer(token(role=role, company="acme"))
    assert_error(await env.client.get("/api/admin/devices", headers=headers), 403, "Forbidden")
    response = await env.client.put(f"/api/admin/devices/{IMEI_A}", headers=headers, content=b"{garbage")
    assert_error(response, 403, "Forbidden")
    assert await env.store.get_device(IMEI_A) is None


async def test_unauthenticated_bad_body_is_401_not_400(env: Env) -> None:
    assert_error(await env.client.post("/api/admin/devices", content=b"{garbage"), 401, "Unauthorized")


# -- devices ----------------------------------------------------------------------------------------


async def test_device_crud_round_trip_through_the_store(env: Env) -> None:
    body = device_body(display_name=" Truck 7 ", speed_limit_kmh=90, protocol="gt06")
    response = await env.client.put(f"/api/admin/devices/{IMEI_A}", headers=ROOT, json=body)
    assert response.status_code == 201
    assert response.json() == {
        "imei": IMEI_A,
        "asset_id": "truck-7",
        "company_id": "acme",
        "display_name": "Truck 7",
        "speed_limit_kmh": 90.0,
        "protocol": "gt06",
    }
    assert await env.store.get_device(IMEI_A) == Device(
        imei=IMEI_A,
        asset_id="truck-7",
        company_id="acme",
        display_name="Truck 7",
        speed_limit_kmh=90.0,
        protocol="gt06",
    )

    response = await env.client.put(f"/api/admin/devices/{IMEI_A}", headers=ROOT, json=device_body(asset_id="van-1"))
    assert response.status_code == 200  # replaced
    assert await env.store.get_device(IMEI_A) == Device(imei=IMEI_A, asset_id="van-1", company_id="acme")

    response = await env.client.post("/api/admin/devices", headers=ROOT, json={"imei": IMEI_B, **device_body("globex")})
    assert response.status_code == 201
    assert (await env.store.get_device(IMEI_B)) == Device(imei=IMEI_B, asset_id="truck-7", company_id="globex")

    listed = (await env.client.get("/api/admin/devices", headers=ROOT)).json()["devices"]
    assert [d["imei"] for d in listed] == [IMEI_A, IMEI_B]
    only = (await env.client.get("/api/admin/devices", params={"company": "globex"}, headers=ROOT)).json()
    assert [d["imei"] for d in only["devices"]] == [IMEI_B]
    got = await env.client.get(f"/api/admin/devices/{IMEI_B}", headers=ROOT)
    assert got.status_code == 200 and got.json()["company_id"] == "globex"

    assert (await env.client.delete(f"/api/admin/devices/{IMEI_A}", headers=ROOT)).status_code == 204
    assert await env.store.get_device(IMEI_A) is None
    assert_error(await env.client.delete(f"/api/admin/devices/{IMEI_A}", headers=ROOT), 404, "NotFound")
    assert_error(await env.client.get(f"/api/admin/devices/{IMEI_A}", headers=ROOT), 404, "NotFound")


async def test_devices_added_elsewhere_are_listed(env: Env) -> None:
    await env.store.put_device(Device(imei=IMEI_A, asset_id="a", company_id="acme"))
    listed = (await env.client.get("/api/admin/devices", headers=ROOT)).json()
    assert listed == {
        "devices": [
            {
                "imei": IMEI_A,
                "asset_id": "a",
                "company_id": "acme",
                "display_name": "",
                "speed_limit_kmh": None,
                "protocol": None,
            }
        ]
    }


@pytest.mark.parametrize(
    ("path_imei", "body", "needle"),
    [
        ("35693803564380", device_body(), "15 digits"),  # 14 digits: IMEI without its check digit
        ("3569380356438091", device_body(), "15 digits"),  # 16 digits: an IMEISV
        ("35693803564380x", device_body(), "15 digits"),
        (IMEI_A, {"company_id": "acme"}, "asset_id"),
        (IMEI_A, device_body(asset_id="   "), "asset_id"),
        (IMEI_A, device_body(asset_id=""), "asset_id"),
        (IMEI_A, device_body(company="*"), "company"),
        (IMEI_A, device_body(protocol="tk103"), "protocol"),
        (IMEI_A, device_body(speed_limit_kmh=0), "speed_limit_kmh"),
        (IMEI_A, device_body(speed_limit_kmh=-5), "speed_limit_kmh"),
        (IMEI_A, device_body(speed_limit_kmh="fast"), "speed_limit_kmh"),
        (IMEI_A, device_body(colour="red"), "colour"),
        (IMEI_A, device_body(imei=IMEI_A), "imei"),  # the path names the IMEI; the body may not
        (IMEI_A, ["not", "an", "object"], "object"),
    ],
)
async def test_invalid_device_is_400_and_stores_nothing(env: Env, path_imei: str, body: Any, needle: str) -> None:
    response = await env.client.put(f"/api/admin/devices/{path_imei}", headers=ROOT, json=body)
    assert needle in assert_error(response, 400, "BadRequest")
    assert await env.store.list_devices() == []


async def test_invalid_json_and_infinite_speed_are_400(env: Env) -> None:
    response = await env.client.put(f"/api/admin/devices/{IMEI_A}", headers=ROOT, content=b"{not json")
    assert_error(response, 400, "BadRequest")
    infinite = b'{"asset_id": "a", "company_id": "acme", "speed_limit_kmh": 1e999}'
    response = await env.client.put(f"/api/admin/devices/{IMEI_A}", headers=ROOT, content=infinite)
    assert_error(response, 400, "BadRequest")  # msgspec refuses the out-of-range number while decoding
    response = await env.client.post("/api/admin/devices", headers=ROOT, json={**device_body(), "imei": "123"})
    assert "imei" in assert_error(response, 400, "BadRequest")
    assert await env.store.list_devices() == []


async def test_oversized_body_is_refused(env: Env) -> None:
    response = await env.client.put(
        f"/api/admin/devices/{IMEI_A}", headers=ROOT, json=device_body(display_name="x" * 100_000)
    )
    assert response.status_code in (400, 413)
    assert await env.store.list_devices() == []


async def test_company_admin_sees_and_changes_only_its_own_devices(env: Env) -> None:
    await env.store.put_device(Device(imei=IMEI_A, asset_id="a", company_id="acme"))
    await env.store.put_device(Device(imei=IMEI_B, asset_id="b", company_id="globex"))

    listed = (await env.client.get("/api/admin/devices", headers=ACME)).json()["devices"]
    assert [d["imei"] for d in listed] == [IMEI_A]
    own = await env.client.get("/api/admin/devices", params={"company": "acme"}, headers=ACME)
    assert [d["imei"] for d in own.json()["devices"]] == [IMEI_A]
    other = await env.client.get("/api/admin/devices", params={"company": "globex"}, headers=ACME)
    assert_error(other, 403, "Forbidden")

    # Another company's device looks exactly like one that does not exist.
    theirs = await env.client.get(f"/api/admin/devices/{IMEI_B}", headers=ACME)
    missing = await env.client.get("/api/admin/devices/111111111111111", headers=ACME)
    assert assert_error(theirs, 404, "NotFound") == assert_error(missing, 404, "NotFound")
    assert_error(await env.client.delete(f"/api/admin/devices/{IMEI_B}", headers=ACME), 404, "NotFound")

    # Neither creating in another company nor taking over its device.
    response = await env.client.put("/api/admin/devices/111111111111111", headers=ACME, json=device_body("globex"))
    assert_error(response, 403, "Forbidden")
    response = await env.client.put(f"/api/admin/devices/{IMEI_B}", headers=ACME, json=device_body("acme"))
    assert_error(response, 409, "Conflict")
    response = await env.client.post("/api/admin/devices", headers=ACME, json={"imei": IMEI_B, **device_body()})
    assert_error(response, 409, "Conflict")
    assert await env.store.get_device(IMEI_B) == Device(imei=IMEI_B, asset_id="b", company_id="globex")
    assert await env.store.get_device("111111111111111") is None

    # Its own company: full control.
    response = await env.client.put(f"/api/admin/devices/{IMEI_A}", headers=ACME, json=device_body(asset_id="a2"))
    assert response.status_code == 200
    assert (await env.client.delete(f"/api/admin/devices/{IMEI_A}", headers=ACME)).status_code == 204


# -- limits and revocations -------------------------------------------------------------------------


async def test_company_limits_set_get_delete(env: Env) -> None:
    limits = (await env.client.get("/api/admin/limits", headers=ROOT)).json()
    assert limits == {"default": 500, "companies": {"acme": 50, "globex": 70}}

    response = await env.client.put("/api/admin/companies/acme/limit", headers=ROOT, json={"max_connections": 5})
    assert response.status_code == 200
    assert response.json() == {"company": "acme", "max_connections": 5}
    response = await env.client.put("/api/admin/companies/initech/limit", headers=ROOT, json={"max_connections": 0})
    assert response.status_code == 200
    assert env.control.company_limit("acme") == 5
    assert env.control.company_limit("initech") == 0
    limits = (await env.client.get("/api/admin/limits", headers=ROOT)).json()
    assert limits["companies"] == {"acme": 5, "globex": 70, "initech": 0}

    assert (await env.client.delete("/api/admin/companies/acme/limit", headers=ROOT)).status_code == 204
    assert env.control.company_limit("acme") is None
    limits = (await env.client.get("/api/admin/limits", headers=ROOT)).json()
    assert limits["companies"] == {"acme": 50, "globex": 70, "initech": 0}  # acme back to its configured cap


@pytest.mark.parametrize(
    "body",
    [{"max_connections": -1}, {"max_connections": "many"}, {}, {"max_connections": 1, "burst": 2}, {"limit": 3}],
)
async def test_invalid_limit_is_400(env: Env, body: dict[str, Any]) -> None:
    response = await env.client.put("/api/admin/companies/acme/limit", headers=ROOT, json=body)
    assert_error(response, 400, "BadRequest")
    assert env.control.company_limit("acme") is None


async def test_company_admin_limits_are_its_own(env: Env) -> None:
    assert (await env.client.get("/api/admin/limits", headers=ACME)).json() == {
        "default": 500,
        "companies": {"acme": 50},
    }
    response = await env.client.put("/api/admin/companies/globex/limit", headers=ACME, json={"max_connections": 1})
    assert_error(response, 403, "Forbidden")
    assert_error(await env.client.delete("/api/admin/companies/globex/limit", headers=ACME), 403, "Forbidden")
    assert env.control.company_limit("globex") is None
    # Not even its own: the cap protects the other tenants.
    response = await env.client.put("/api/admin/companies/acme/limit", headers=ACME, json={"max_connections": 9})
    assert_error(response, 403, "Forbidden")
    assert_error(await env.client.delete("/api/admin/companies/acme/limit", headers=ACME), 403, "Forbidden")
    assert env.control.company_limit("acme") is None


async def test_revocation(env: Env) -> None:
    victim = token(role="office", company="acme")
    jti = env.verifier.verify(victim).jti
    exp = time.time() + 600
    response = await env.client.post("/api/admin/revocations", headers=ROOT, json={"jti": jti, "exp": exp})
    assert response.status_code == 202
    assert response.json() == {"jti": jti, "exp": exp, "revoked": True}
    assert env.control.is_revoked(jti)

    before = time.time()
    response = await env.client.post("/api/admin/revocations", headers=ROOT, json={"jti": "other-jti"})
    assert response.status_code == 202
    assert before + 24 * 3600 - 5 <= response.json()["exp"] <= time.time() + 24 * 3600 + 5
    assert env.control.is_revoked("other-jti")


@pytest.mark.parametrize("body", [{}, {"jti": ""}, {"jti": "x", "exp": "tomorrow"}, {"jti": "x", "why": "because"}])
async def test_invalid_revocation_is_400(env: Env, body: dict[str, Any]) -> None:
    assert_error(await env.client.post("/api/admin/revocations", headers=ROOT, json=body), 400, "BadRequest")


# -- failures -------------------------------------------------------------------------------------


async def test_store_failure_is_503_without_details(tmp_path: Path) -> None:
    # A database in a directory that does not exist: every call fails inside sqlite3.
    store = open_state(StateSettings(sqlite_path=str(tmp_path / "missing" / "state.sqlite")))
    ctx = RestContext(store, MemoryControl(), TokenVerifier(AUTH), SETTINGS, lambda: {"status": "ok"})
    server = await start_rest(create_app(ctx), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            for response in (
                await client.get("/api/admin/devices", headers=ROOT),
                await client.put(f"/api/admin/devices/{IMEI_A}", headers=ROOT, json=device_body()),
            ):
                message = assert_error(response, 503, "Unavailable")
                assert "sqlite" not in message.lower() and "missing" not in message
    finally:
        await server.stop()
        await store.close()


async def test_control_failure_is_503(env: Env) -> None:
    await env.control.close()  # writes now raise ControlError
    response = await env.client.put("/api/admin/companies/acme/limit", headers=ROOT, json={"max_connections": 1})
    assert_error(response, 503, "Unavailable")
    response = await env.client.post("/api/admin/revocations", headers=ROOT, json={"jti": "x"})
    assert_error(response, 503, "Unavailable")


async def test_requests_in_parallel(env: Env) -> None:
    imeis = [f"35693803564{n:04d}" for n in range(20)]
    responses = await asyncio.gather(
        *(env.client.put(f"/api/admin/devices/{imei}", headers=ROOT, json=device_body()) for imei in imeis)
    )
    assert [r.status_code for r in responses] == [201] * 20
    assert [d.imei for d in await env.store.list_devices("acme")] == imeis
