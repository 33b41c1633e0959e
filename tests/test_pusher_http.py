"""The HTTP half of the Pusher protocol against a running relay: /broadcasting/auth and the signed HTTP API.

The HTTP API is driven by the official Python server library (PyPI ``pusher``), which is synchronous:
its calls run in a thread so the relay keeps serving in this loop. Deliveries are checked on a raw
websockets Pusher client (pusher-js itself runs in tests/test_pusher_js.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pusher
import pytest
from relaykit import AUTH, JsonSocket, System, position, running_system
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.records import Device
from relay.pusher_auth import (
    RequestAuthError,
    body_md5,
    canonical_query,
    channel_auth,
    request_signature,
    sign_request,
    verify_channel_auth,
    verify_request,
)
from relay.settings import AuthSettings, PusherAppSettings, PusherSettings
from relay.tokens import mint_token

APP_ID, KEY, APP_SECRET = "1", "fleetgate", "app-secret-of-the-pusher-http-tests"
OTHER = PusherAppSettings(id="2", key="second-key", secret="second-app-secret", name="second")
PUSHER = PusherSettings(apps=[PusherAppSettings(id=APP_ID, key=KEY, secret=APP_SECRET), OTHER])

DEVICES = [
    Device(imei="356938035643809", asset_id="truck-7", company_id="acme"),
    Device(imei="356938035643810", asset_id="truck-8", company_id="acme"),
    Device(imei="490154203237518", asset_id="van-9", company_id="globex"),
]
SOCKET = "123.456"


# -- request signing (pure) ------------------------------------------------------------------------------

DOC_KEY, DOC_SECRET = "278d425bdf160c739803", "7ad3773142a6692b25b8"
DOC_BODY = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'


def test_request_signature_matches_the_rest_api_reference_vector() -> None:
    # pusher.md section 6.1 (the REST API reference's worked example, recomputed).
    assert body_md5(DOC_BODY) == "ec365a775a4cd0599faeb73354201b6f"
    params = [("auth_key", DOC_KEY), ("auth_timestamp", "1353088179"), ("auth_version", "1.0")]
    params.append(("body_md5", body_md5(DOC_BODY)))
    signature = request_signature(DOC_SECRET, "POST", "/apps/3/events", params)
    assert signature == "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    verify_request(
        DOC_KEY, DOC_SECRET, "POST", "/apps/3/events", [*params, ("auth_signature", signature)], DOC_BODY,
        now=1353088179 + 599,
    )  # fmt: skip


def test_channel_auth_matches_the_auth_signatures_reference_vector() -> None:
    expected = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"  # pusher.md section 4
    assert channel_auth(DOC_KEY, DOC_SECRET, "1234.1234", "private-foobar") == f"{DOC_KEY}:{expected}"


def test_canonical_query_lowercases_sorts_and_does_not_escape() -> None:
    params = [("info", "user_count,subscription_count"), ("Auth_Key", "k"), ("auth_signature", "x"), ("a", "b c")]
    assert canonical_query(params) == "a=b c&auth_key=k&info=user_count,subscription_count"


def _signed(method: str = "POST", body: bytes = DOC_BODY, now: float = 1000.0, **params: str) -> list[tuple[str, str]]:
    return list(sign_request(DOC_KEY, DOC_SECRET, method, "/apps/3/events", params, body, now=now).items())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda q: [(k, "other" if k == "auth_key" else v) for k, v in q], "wrong_key"),
        (lambda q: [(k, "2.0" if k == "auth_version" else v) for k, v in q], "bad_version"),
        (lambda q: [(k, "soon" if k == "auth_timestamp" else v) for k, v in q], "bad_timestamp"),
        (lambda q: [(k, "0" * 32 if k == "body_md5" else v) for k, v in q], "body_md5_mismatch"),
        (lambda q: [(k, v) for k, v in q if k != "body_md5"], "body_md5_mismatch"),
        (lambda q: [(k, "0" * 64 if k == "auth_signature" else v) for k, v in q], "invalid_signature"),
        (lambda q: [*q, ("info", "subscription_count")], "invalid_signature"),  # an unsigned parameter
        (lambda q: [(k, v) for k, v in q if k != "auth_timestamp"], "missing_param"),
        (lambda q: [*q, ("auth_key", DOC_KEY)], "missing_param"),  # twice
    ],
)
def test_verify_request_refuses(change: Any, reason: str) -> None:
    with pytest.raises(RequestAuthError) as caught:
        verify_request(DOC_KEY, DOC_SECRET, "POST", "/apps/3/events", change(_signed()), DOC_BODY, now=1000.0)
    assert caught.value.reason == reason


def test_verify_request_checks_the_clock_method_path_and_body() -> None:
    params = _signed(now=1000.0)
    verify_request(DOC_KEY, DOC_SECRET, "POST", "/apps/3/events", params, DOC_BODY, now=1600.0)
    verify_request(DOC_KEY, DOC_SECRET, "POST", "/apps/3/events", params, DOC_BODY, now=400.0)
    for now in (1600.5, 399.0):
        with pytest.raises(RequestAuthError, match="600 s"):
            verify_request(DOC_KEY, DOC_SECRET, "POST", "/apps/3/events", params, DOC_BODY, now=now)
    for method, path, body in (("GET", "/apps/3/events", DOC_BODY), ("POST", "/apps/4/events", DOC_BODY),
                               ("POST", "/apps/3/events", DOC_BODY + b" ")):  # fmt: skip
        with pytest.raises(RequestAuthError):
            verify_request(DOC_KEY, DOC_SECRET, method, path, params, body, now=1000.0)


def test_get_requests_may_sign_the_md5_of_an_empty_body() -> None:
    # pusher-http-python adds body_md5 to GET requests too (pusher.md section 6.2); the Node library does not.
    with_md5 = [*sign_request(DOC_KEY, DOC_SECRET, "GET", "/apps/3/channels", {"body_md5": body_md5(b"")}, b"",
                              now=5.0).items()]  # fmt: skip
    verify_request(DOC_KEY, DOC_SECRET, "GET", "/apps/3/channels", with_md5, b"", now=5.0)
    without = list(sign_request(DOC_KEY, DOC_SECRET, "GET", "/apps/3/channels", {}, b"", now=5.0).items())
    verify_request(DOC_KEY, DOC_SECRET, "GET", "/apps/3/channels", without, b"", now=5.0)


# -- a running relay ---------------------------------------------------------------------------------------


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    async with running_system(tmp_path, devices=DEVICES, rest=True, pusher=PUSHER) as system:
        yield system


@pytest.fixture
async def http(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=system.rest_url, timeout=5.0) as client:
        yield client


def bearer(role: str = "office", company: str = "acme", user: str = "office-1", **extra: Any) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_token(AUTH, role=role, company=company, user=user, ttl_s=600, **extra)}


def server_lib(system: System, secret: str = APP_SECRET, app_id: str = APP_ID, key: str = KEY) -> pusher.Pusher:
    return pusher.Pusher(
        app_id=app_id, key=key, secret=secret, host="127.0.0.1", port=system.relay.rest_port, ssl=False, timeout=5
    )


async def call(function: Any, *args: Any) -> Any:
    """A call of the synchronous server library, off this loop (which serves the relay)."""
    return await asyncio.to_thread(function, *args)


class PusherSocket(JsonSocket):
    """A Pusher protocol 7 client on a raw websockets connection."""

    def __init__(self, ws: ClientConnection, socket_id: str) -> None:
        super().__init__(ws)
        self.socket_id = socket_id

    @classmethod
    async def connect(cls, system: System, key: str = KEY) -> PusherSocket:
        ws = await connect(f"ws://127.0.0.1:{system.relay.ws_port}/app/{key}?protocol=7&client=js&version=8.6.0")
        established = json.loads(await asyncio.wait_for(ws.recv(), 3))
        assert established["event"] == "pusher:connection_established", established
        return cls(ws, json.loads(established["data"])["socket_id"])

    async def next(self, event: str, timeout: float = 3.0) -> dict[str, Any]:
        return await self.next_where("event", event, timeout)

    async def subscribe(self, channel: str, auth: str | None = None, channel_data: str | None = None) -> None:
        data = {"channel": channel}
        if auth is not None:
            data["auth"] = auth
        if channel_data is not None:
            data["channel_data"] = channel_data
        await self.ws.send(json.dumps({"event": "pusher:subscribe", "data": data}))
        reply = await self.next("pusher_internal:subscription_succeeded")
        assert reply["channel"] == channel

    async def authorised(self, http: httpx.AsyncClient, channel: str, **token: Any) -> None:
        """Subscribe with an auth obtained from /broadcasting/auth."""
        reply = await http.post("/broadcasting/auth", data=form(self.socket_id, channel), headers=bearer(**token))
        assert reply.status_code == 200, reply.text
        await self.subscribe(channel, **reply.json())


def form(socket_id: str, channel: str, **extra: str) -> dict[str, str]:
    return {"socket_id": socket_id, "channel_name": channel, **extra}


def assert_error(response: httpx.Response, status: int, contains: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"}
    assert contains in body["message"], body


# -- /broadcasting/auth --------------------------------------------------------------------------------------


async def test_auth_answers_a_signature_for_form_and_json_bodies(http: httpx.AsyncClient) -> None:
    channel = "private-account.acme"
    by_form = await http.post("/broadcasting/auth", data=form(SOCKET, channel), headers=bearer())
    by_json = await http.post("/broadcasting/auth", json=form(SOCKET, channel), headers=bearer())
    for reply in (by_form, by_json):
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        assert reply.headers["access-control-allow-origin"] == "*"
        assert set(reply.json()) == {"auth"}  # exactly what pusher-js puts into pusher:subscribe
        assert verify_channel_auth(KEY, APP_SECRET, reply.json()["auth"], SOCKET, channel)
    assert by_form.json() == by_json.json()


async def test_auth_signs_with_the_app_named_by_key_or_id_else_the_first(http: httpx.AsyncClient) -> None:
    channel = "private-account.acme"
    for query in ({"app_key": OTHER.key}, {"app_id": OTHER.id}):
        reply = await http.post("/broadcasting/auth", params=query, data=form(SOCKET, channel), headers=bearer())
        assert verify_channel_auth(OTHER.key, OTHER.secret, reply.json()["auth"], SOCKET, channel)
    in_body = await http.post("/broadcasting/auth", data=form(SOCKET, channel, app_key=OTHER.key), headers=bearer())
    assert in_body.json()["auth"].startswith(f"{OTHER.key}:")
    unknown = await http.post("/broadcasting/auth", params={"app_key": "nope"}, data=form(SOCKET, channel),
                              headers=bearer())  # fmt: skip
    assert_error(unknown, 404, "no such Pusher app")


async def test_presence_channel_data_comes_from_the_token_never_from_the_client(http: httpx.AsyncClient) -> None:
    channel = "presence-account.acme"
    forged = json.dumps({"user_id": "ceo", "user_info": {"name": "The CEO"}})
    reply = await http.post(
        "/broadcasting/auth", data=form(SOCKET, channel, channel_data=forged), headers=bearer(name="Ann Example")
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"auth", "channel_data"}
    assert json.loads(body["channel_data"]) == {"user_id": "office-1", "user_info": {"name": "Ann Example",
                                                                                      "role": "office"}}  # fmt: skip
    assert verify_channel_auth(KEY, APP_SECRET, body["auth"], SOCKET, channel, body["channel_data"])
    nameless = await http.post("/broadcasting/auth", json=form(SOCKET, channel), headers=bearer(role="admin"))
    assert json.loads(nameless.json()["channel_data"])["user_info"] == {"name": "office-1", "role": "admin"}


@pytest.mark.parametrize(
    ("channel", "token", "status"),
    [
        ("private-account.acme", {"role": "admin"}, 200),
        ("private-account.globex", {}, 403),
        ("presence-account.globex", {}, 403),
        ("private-account.acme", {"role": "driver"}, 403),
        ("private-account.acme", {"assets": ["truck-7"]}, 403),  # restricted tokens see single assets only
        ("presence-account.acme", {"assets": ["truck-7"]}, 403),
        ("private-asset.truck-7", {}, 200),  # registered to acme, no position yet
        ("private-asset.truck-7", {"assets": ["truck-7"]}, 200),
        ("private-asset.truck-8", {"assets": ["truck-7"]}, 403),  # acme's, but not listed
        ("private-asset.van-9", {}, 403),  # globex's (registry)
        ("private-asset.van-9", {"company": "globex"}, 200),
        ("private-asset.gx-1", {}, 403),  # globex's (last position)
        ("private-asset.nowhere", {}, 403),  # unknown
        ("private-asset.truck-7", {"role": "driver"}, 403),
        ("presence-asset.truck-7", {}, 403),
        ("private-encrypted-account.acme", {}, 403),
        ("private-fleet", {}, 403),
        ("news", {}, 403),  # public channels need no auth
    ],
)
async def test_auth_channel_rules(
    system: System, http: httpx.AsyncClient, channel: str, token: dict[str, Any], status: int
) -> None:
    await system.publish([position("gx-1", "globex")])
    reply = await http.post("/broadcasting/auth", data=form(SOCKET, channel), headers=bearer(**token))
    assert reply.status_code == status, reply.text
    if status == 403:
        assert_error(reply, 403)
        assert reply.headers["access-control-allow-origin"] == "*"  # a browser may read why


async def test_auth_refuses_another_companys_asset_by_its_last_position(
    system: System, http: httpx.AsyncClient
) -> None:
    # Not in acme's registry, but reporting under globex: the channel would carry globex's positions.
    await system.publish([position("moved-1", "globex")])
    reply = await http.post("/broadcasting/auth", data=form(SOCKET, "private-asset.moved-1"), headers=bearer())
    assert_error(reply, 403, "may not see that asset")


async def test_auth_tokens_missing_invalid_expired_or_revoked_are_401(system: System, http: httpx.AsyncClient) -> None:
    other = AuthSettings(secret="another-secret-nobody-here-trusts-0123456789")
    revoked = bearer()
    jti = jwt.decode(revoked["Authorization"].split()[1], options={"verify_signature": False})["jti"]
    await system.control.revoke(jti, time.time() + 600)
    expired = mint_token(AUTH, role="office", company="acme", user="u", ttl_s=10, now=time.time() - 60)
    cases = {
        "an 'Authorization: Bearer <token>' header is required": [{}, {"Authorization": "Basic dXNlcjpwdw=="},
                                                                  {"Authorization": "Bearer"}],
        "the token is not valid": [{"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Bearer " + mint_token(
            other, role="office", company="acme", user="u", ttl_s=60)}],
        "the token has expired": [{"Authorization": f"Bearer {expired}"}],
        "the token has been revoked": [revoked],
    }  # fmt: skip
    for message, headers in cases.items():
        for header in headers:
            # Even with a bad body: the token is checked first, so a stranger learns nothing else.
            reply = await http.post("/broadcasting/auth", data={"socket_id": "x"}, headers=header)
            assert_error(reply, 401, message)
            assert reply.headers["www-authenticate"].startswith("Bearer")
            assert reply.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"data": form("abc", "private-account.acme")}, "socket_id"),
        ({"data": form("1.2.3", "private-account.acme")}, "socket_id"),
        ({"data": {"channel_name": "private-account.acme"}}, "socket_id"),
        ({"data": {"socket_id": SOCKET}}, "channel_name is required"),
        ({"json": {"socket_id": 1.5, "channel_name": "private-account.acme"}}, "socket_id"),
        ({"json": ["socket_id"]}, "JSON object"),
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
    ],
)
async def test_auth_bad_bodies_are_400(http: httpx.AsyncClient, body: dict[str, Any], message: str) -> None:
    headers = {**bearer(), **body.pop("headers", {})}
    assert_error(await http.post("/broadcasting/auth", headers=headers, **body), 400, message)


async def test_auth_answers_cors_preflights(http: httpx.AsyncClient) -> None:
    reply = await http.options(
        "/broadcasting/auth",
        headers={"Origin": "https://fleet.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, x-csrf-token"},
    )  # fmt: skip
    assert reply.status_code == 204
    assert reply.headers["access-control-allow-origin"] == "*"
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert reply.headers["access-control-allow-headers"] == "authorization, x-csrf-token"


async def test_an_authorised_socket_receives_records_and_is_closed_when_its_token_is_revoked(
    system: System, http: httpx.AsyncClient
) -> None:
    sock = await PusherSocket.connect(system)
    headers = bearer()
    reply = await http.post("/broadcasting/auth", data=form(sock.socket_id, "private-account.acme"), headers=headers)
    await sock.subscribe("private-account.acme", **reply.json())
    await system.publish([position("truck-7", "acme")])
    event = await sock.next("location.updated")
    assert json.loads(event["data"])["assetId"] == "truck-7"
    jti = jwt.decode(headers["Authorization"].split()[1], options={"verify_signature": False})["jti"]
    await system.control.revoke(jti, time.time() + 600)  # note_grant tied the socket to the token
    error = await sock.next("pusher:error")
    assert error["data"]["code"] == 4009
    with pytest.raises(ConnectionClosed) as closed:
        await sock.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4009


# -- the HTTP API through the official Python library ---------------------------------------------------------


async def test_library_trigger_reaches_subscribers_except_the_excluded_socket(system: System) -> None:
    first, second = await PusherSocket.connect(system), await PusherSocket.connect(system)
    for sock in (first, second):
        await sock.subscribe("news")
    lib = server_lib(system)
    assert await call(lib.trigger, ["news", "other-news"], "notice.posted", {"text": "hello"}) == {}
    for sock in (first, second):
        event = await sock.next("notice.posted")
        assert event["channel"] == "news"
        assert json.loads(event["data"]) == {"text": "hello"}  # the publisher's string, relayed as is
    await call(lib.trigger, "news", "notice.posted", "not json", second.socket_id)
    assert (await first.next("notice.posted"))["data"] == "not json"
    await second.nothing_within(0.3)


async def test_library_batch_channels_users_and_terminate(system: System, http: httpx.AsyncClient) -> None:
    watcher, member = await PusherSocket.connect(system), await PusherSocket.connect(system)
    await watcher.subscribe("news")
    await member.authorised(http, "presence-account.acme", name="Ann")
    await member.authorised(http, "private-account.acme")
    lib = server_lib(system)
    batch = [{"channel": "news", "name": "a.one", "data": "1"}, {"channel": "news", "name": "a.two", "data": {"n": 2}}]
    assert await call(lib.trigger_batch, batch) == {"batch": [{}, {}]}
    assert (await watcher.next("a.one"))["data"] == "1"
    assert json.loads((await watcher.next("a.two"))["data"]) == {"n": 2}

    everything = await call(lib.channels_info)
    assert everything == {"channels": {"news": {}, "presence-account.acme": {}, "private-account.acme": {}}}
    presence = await call(lib.channels_info, "presence-", ["user_count"])
    assert presence == {"channels": {"presence-account.acme": {"user_count": 1}}}
    with pytest.raises(pusher.errors.PusherBadRequest):
        await call(lib.channels_info, None, ["user_count"])  # user_count needs the presence- prefix
    assert await call(lib.channel_info, "news", ["subscription_count"]) == {"occupied": True, "subscription_count": 1}
    assert await call(lib.channel_info, "private-nobody") == {"occupied": False}
    assert await call(lib.channel_info, "presence-account.acme", ["user_count", "subscription_count"]) == {
        "occupied": True, "subscription_count": 1, "user_count": 1}  # fmt: skip
    with pytest.raises(pusher.errors.PusherBadRequest):
        await call(lib.channel_info, "news", ["user_count"])
    assert await call(lib.users_info, "presence-account.acme") == {"users": [{"id": "office-1"}]}
    with pytest.raises(pusher.errors.PusherBadRequest):
        await call(lib.users_info, "news")

    # pusher-http-python 3.3 posts to /users/{id}/terminate_connections, without /apps/{id}. A socket
    # that only authorised a private channel with the user's token is the user's too.
    private_only = await PusherSocket.connect(system)
    await private_only.authorised(http, "private-account.acme")
    assert await call(lib.terminate_user_connections, "office-1") == {}
    for sock in (member, private_only):
        assert (await sock.next("pusher:error"))["data"]["code"] == 4009
        with pytest.raises(ConnectionClosed):
            await sock.recv()
    await watcher.nothing_within(0.2)


async def test_library_with_a_wrong_secret_key_or_app_is_refused(system: System) -> None:
    with pytest.raises(pusher.errors.PusherBadAuth, match="auth_signature"):
        await call(server_lib(system, secret="not-the-secret").trigger, "news", "e", "1")
    with pytest.raises(pusher.errors.PusherBadAuth, match="auth_key"):
        await call(server_lib(system, key=OTHER.key, secret=OTHER.secret).trigger, "news", "e", "1")
    with pytest.raises(pusher.errors.PusherBadAuth, match="auth_key"):  # terminate: the key names the app
        await call(server_lib(system, key="nope").terminate_user_connections, "u")
    with pytest.raises(pusher.errors.PusherBadStatus, match="404"):
        await call(server_lib(system, app_id="99").trigger, "news", "e", "1")
    sock = await PusherSocket.connect(system)
    await sock.subscribe("news")
    assert await call(server_lib(system, app_id=OTHER.id, key=OTHER.key, secret=OTHER.secret).trigger,
                      "news", "e", "1") == {}  # fmt: skip
    await sock.nothing_within(0.2)  # apps never share a channel


# -- the HTTP API by hand: what the libraries check before sending ----------------------------------------------


async def signed(
    http: httpx.AsyncClient, method: str, path: str, body: Any = None, *, now: float | None = None,
    send: bytes | None = None, **params: str,
) -> httpx.Response:  # fmt: skip
    """A request signed as the libraries sign it (``send`` replaces the body after signing)."""
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    query = sign_request(KEY, APP_SECRET, method, path, params, raw, now=time.time() if now is None else now)
    headers = {"Content-Type": "application/json"} if raw else {}
    return await http.request(method, path, params=query, content=raw if send is None else send, headers=headers)


async def test_stale_timestamps_and_tampered_bodies_are_401(system: System, http: httpx.AsyncClient) -> None:
    event = {"name": "e", "channels": ["news"], "data": "1"}
    assert (await signed(http, "POST", "/apps/1/events", event)).json() == {}
    stale = await signed(http, "POST", "/apps/1/events", event, now=time.time() - 601)
    assert_error(stale, 401, "auth_timestamp")
    future = await signed(http, "POST", "/apps/1/events", event, now=time.time() + 601)
    assert_error(future, 401, "auth_timestamp")
    tampered = await signed(http, "POST", "/apps/1/events", event, send=json.dumps({**event, "data": "2"}).encode())
    assert_error(tampered, 401, "body_md5")
    unsigned = await http.post("/apps/1/events", json=event)
    assert_error(unsigned, 401, "auth_key, auth_timestamp, auth_version, auth_signature")


async def test_limits_and_bad_bodies(system: System, http: httpx.AsyncClient) -> None:
    def event(**changes: Any) -> dict[str, Any]:
        return {"name": "e", "channels": ["news"], "data": "1", **changes}

    post = "/apps/1/events"
    assert (await signed(http, "POST", post, event(data="x" * 10240))).status_code == 200
    assert_error(await signed(http, "POST", post, event(data="x" * 10241)), 413, "10240 bytes")
    assert_error(await signed(http, "POST", post, event(data="é" * 5121)), 413)  # bytes, not characters
    assert (await signed(http, "POST", post, event(channels=[f"c{i}" for i in range(100)]))).status_code == 200
    assert_error(await signed(http, "POST", post, event(channels=[f"c{i}" for i in range(101)])), 400, "100 channels")
    assert_error(await signed(http, "POST", post, event(channels=[])), 400, "1 to 100")
    assert (await signed(http, "POST", post, event(name="n" * 200))).status_code == 200
    assert_error(await signed(http, "POST", post, event(name="n" * 201)), 400, "200 characters")
    assert_error(await signed(http, "POST", post, event(name="pusher:error")), 400, "reserved")
    assert_error(await signed(http, "POST", post, event(channels=["c" * 165])), 400, "164")
    assert_error(await signed(http, "POST", post, event(channels=["no spaces"])), 400, "may only contain")
    assert_error(await signed(http, "POST", post, event(data={"an": "object"})), 400, "data")
    assert_error(await signed(http, "POST", post, event(socket_id="abc")), 400, "socket_id")
    assert_error(await signed(http, "POST", post, event(info="colour")), 400, "info attributes")
    assert_error(await signed(http, "POST", post, b"{"), 400, "not valid JSON")
    single = await signed(
        http, "POST", post, {"name": "e", "channel": "news", "data": "1", "info": "subscription_count"}
    )
    assert single.json() == {"channels": {"news": {"subscription_count": 0}}}

    batch = "/apps/1/batch_events"
    ten = [{"name": "e", "channel": "news", "data": str(i)} for i in range(10)]
    assert (await signed(http, "POST", batch, {"batch": ten})).json() == {"batch": [{}] * 10}
    assert_error(await signed(http, "POST", batch, {"batch": [*ten, ten[0]]}), 400, "at most 10")
    bad_last = [*ten[:9], {"name": "e", "channel": "news", "data": "x" * 10241}]
    assert_error(await signed(http, "POST", batch, {"batch": bad_last}), 413)
    with_info = await signed(http, "POST", batch, {"batch": [{**ten[0], "info": "subscription_count"}, ten[1]]})
    assert with_info.json() == {"batch": [{"subscription_count": 0}, {}]}
    # Node's library signs its POST /apps/{id}/users/{id}/terminate_connections this way.
    assert (await signed(http, "POST", "/apps/1/users/someone/terminate_connections", {})).json() == {}
