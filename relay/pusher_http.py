"""The HTTP half of the Pusher protocol, served by the REST service: channel authorisation and the HTTP API.

Endpoints (documented for users in ``docs/pusher.md``)::

    POST    /broadcasting/auth                       bearer access token; form or JSON socket_id, channel_name
    OPTIONS /broadcasting/auth                       CORS preflight (browsers on another origin)
    POST    /apps/{app_id}/events                    signed (pusher.md section 6): trigger one event
    POST    /apps/{app_id}/batch_events              signed: up to 10 events
    GET     /apps/{app_id}/channels                  signed: occupied channels [filter_by_prefix, info]
    GET     /apps/{app_id}/channels/{channel}        signed: one channel [info]
    GET     /apps/{app_id}/channels/{channel}/users  signed: members of a presence channel
    POST    /apps/{app_id}/users/{user}/terminate_connections
    POST    /users/{user}/terminate_connections      the path pusher-http-python 3.3 uses (no /apps/{id}):
                                                     the app is the one whose key signed the request

Channel authorisation turns an access token (the native protocol's JWT) into a Pusher
``auth`` signature, and only for channels the token may see: ``private-account.{company}``
and ``presence-account.{company}`` for an office or admin token of that company without an
``assets`` restriction, ``private-asset.{asset}`` for an office or admin token of the asset's
company (listing the asset when the token lists any). Driver tokens subscribe to nothing, as
in the native protocol. Presence ``channel_data`` is built here from the token; a client
never chooses who it is.

Tracking-link channels (``private-tracking-link.{uuid}``, when the relay serves tracking links)
take a link *session* token as the bearer instead, the one ``POST
/api/public/tracking-links/{uuid}/verify`` returned; it authorises that link's channel only. A
refusal answers the :class:`~relay.links.service.LinkAccessError`'s HTTP status with ``{"error",
"code", "message"}``, ``code`` being the WebSocket close code (4001-4005) a subscription would get.

The HTTP API trusts whoever holds the app secret with every channel of that app.

Errors are raised as Litestar exceptions and turned into ``{"error", "message"}`` JSON by
:mod:`relay.rest`, in one place.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Request, Response, Router, get, post, route
from litestar.di import NamedDependency, Provide
from litestar.enums import HttpMethod
from litestar.exceptions import (
    ClientException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.params import FromPath

from gateway.state.base import StateStore
from relay import metrics as relay_metrics
from relay import pusher_channels as wire
from relay.bearer import verified_claims
from relay.control import Control
from relay.links.api import LinkAccessError
from relay.pusher_auth import RequestAuthError, channel_auth, verify_request
from relay.settings import PusherAppSettings
from relay.tokens import Claims, TokenVerifier

if TYPE_CHECKING:
    from relay.pusher import PusherHub
    from relay.rest import RestContext

__all__ = ["PusherContext", "pusher_routes"]

log = logging.getLogger(__name__)

# Limits of the hosted service (pusher.md sections 3 and 5); event data is limited by [pusher] max_message
# (10 KB by default; larger: 413), channel names (164), event names (200) and user ids (128) as on the socket.
MAX_CHANNELS_PER_EVENT = 100
MAX_BATCH = 10
# A batch of 10 events of 10 KB each, JSON-escaped, fits; the admin API keeps its 64 KB cap.
API_MAX_BODY_BYTES = 256 * 1024

_SOCKET_ID = re.compile(r"\d+\.\d+")  # what the official libraries validate
_RESERVED_EVENT_PREFIXES = ("pusher:", "pusher_internal:")  # only the relay speaks these
_AUTHORISED_CHANNEL = re.compile(r"(private|presence)-(account|asset)\.(.+)")
_ROLES_THAT_WATCH = ("office", "admin")
_INFO_ATTRIBUTES = frozenset({"user_count", "subscription_count"})

_JSON = "application/json"
# The auth endpoint answers browsers on any origin: the bearer token is sent explicitly (not a
# cookie), so a foreign page gains nothing it could not already do with the token.
_CORS = {"Access-Control-Allow-Origin": "*"}
_PREFLIGHT = {
    **_CORS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


class PusherContext:
    """What these endpoints work with (a slice of :class:`relay.rest.RestContext`).

    A plain class, not a dataclass: Litestar would resolve a dataclass dependency's field
    annotations at request time, and :class:`~relay.pusher.PusherHub` is imported for typing only.
    """

    __slots__ = ("control", "hub", "store", "verifier")

    def __init__(self, hub: PusherHub, verifier: TokenVerifier, control: Control, store: StateStore) -> None:
        self.hub = hub
        self.verifier = verifier
        self.control = control
        self.store = store


# -- request bodies of the HTTP API -----------------------------------------------------------------
# Unknown fields are ignored, not refused: these bodies come from third-party server libraries,
# which add optional fields over time.


class _Event(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    data: str
    socket_id: str | None = None
    info: str | None = None


class EventBody(_Event, frozen=True, kw_only=True):
    channels: list[str] | None = None
    channel: str | None = None


class BatchEvent(_Event, frozen=True, kw_only=True):
    channel: str


class BatchBody(msgspec.Struct, frozen=True, kw_only=True):
    batch: list[BatchEvent]


@dataclass(frozen=True)
class _Trigger:
    """One validated event, ready for the hub."""

    name: str
    channels: list[str]
    data: str
    socket_id: str | None
    info: frozenset[str]


# -- errors ------------------------------------------------------------------------------------------


def _bad_request(message: str, headers: Mapping[str, str] | None = None) -> ValidationException:
    return ValidationException(detail=message, headers=dict(headers) if headers else None)


def _forbidden(message: str) -> PermissionDeniedException:
    return PermissionDeniedException(detail=message, headers=_CORS)


def _json(body: Any, headers: Mapping[str, str] | None = None) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=200, media_type=_JSON, headers=headers)


# -- channel authorisation -------------------------------------------------------------------------


def _claims(pusher: PusherContext, header: str | None) -> Claims:
    """The verified, unrevoked claims of the bearer token, else 401 (with the CORS headers)."""
    return verified_claims(pusher.verifier, pusher.control, header, headers=_CORS)


async def _auth_fields(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The string fields of a form-encoded (pusher-js, Echo), multipart or JSON body."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    body = await request.body()
    if media == _JSON or media.endswith("+json"):
        try:
            decoded = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise _bad_request("the body is not valid JSON", _CORS) from None
        if not isinstance(decoded, dict):
            raise _bad_request("the body must be a JSON object", _CORS)
        return {k: v for k, v in decoded.items() if isinstance(v, str)}
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    except UnicodeDecodeError:
        raise _bad_request("the form body is not UTF-8", _CORS) from None


def _auth_app(hub: PusherHub, query: Mapping[str, str], fields: Mapping[str, str]) -> PusherAppSettings:
    """The app whose key signs: ``app_key`` or ``app_id`` (query or body) when given, else the first app."""
    key = query.get("app_key") or fields.get("app_key")
    app_id = query.get("app_id") or fields.get("app_id")
    if key:
        app = hub.app_by_key(key)
    elif app_id:
        app = hub.app_by_id(app_id)
    else:
        app = hub.settings.apps[0] if hub.settings.apps else None
    if app is None:
        raise NotFoundException(detail="no such Pusher app", headers=_CORS)
    return app


async def _asset_company(store: StateStore, company: str, asset_id: str) -> str | None:
    """The company whose data ``private-asset.{asset_id}`` carries: its last position's, else the registry's.

    The registry is searched within ``company`` only, so another company's device stays invisible.
    """
    last = await store.last_position(asset_id)
    if last is not None:
        return last.company_id
    devices = await store.list_devices(company)
    return company if any(d.asset_id == asset_id for d in devices) else None


async def _account_rule(store: StateStore, claims: Claims, company: str) -> None:
    if company != claims.company:
        raise _forbidden("this token may not see that company's channels")
    if claims.assets is not None:
        raise _forbidden("this token is restricted to some assets: subscribe to private-asset.{id} for each")


async def _asset_rule(store: StateStore, claims: Claims, asset_id: str) -> None:
    # One message for "not listed", "another company's" and "unknown": the answer must not tell
    # a client which asset ids exist elsewhere.
    refused = _forbidden("this token may not see that asset")
    if claims.assets is not None and asset_id not in claims.assets:
        raise refused
    if await _asset_company(store, claims.company, asset_id) != claims.company:
        raise refused


_CHANNEL_RULES = {
    ("private", "account"): _account_rule,
    ("presence", "account"): _account_rule,
    ("private", "asset"): _asset_rule,
}


async def authorise_channel(store: StateStore, claims: Claims, channel: str) -> None:
    """Return when ``claims`` may subscribe to ``channel``; raise 403 otherwise (see the module docstring)."""
    match = _AUTHORISED_CHANNEL.fullmatch(channel)
    rule = _CHANNEL_RULES.get((match[1], match[2])) if match is not None else None
    if match is None or rule is None:
        raise _forbidden(
            "channels authorised here: private-account.{company}, presence-account.{company}, private-asset.{asset}"
        )
    if claims.role not in _ROLES_THAT_WATCH:
        raise _forbidden("a driver token does not subscribe to channels; use an office token")
    await rule(store, claims, match[3])


def presence_data(claims: Claims) -> str:
    """The presence ``channel_data`` for this token: its ``sub`` as user id, name and role as user info."""
    info = {"name": claims.name or claims.sub, "role": claims.role}
    return msgspec.json.encode({"user_id": claims.sub, "user_info": info}).decode()


async def _tracking_link_fields(request: Request[Any, Any, Any], pusher: PusherContext) -> dict[str, str] | None:
    """The body's fields when it asks for a tracking-link channel (served here); None otherwise, also
    for a body that does not parse: the access-token path then answers (its token check comes first)."""
    if pusher.hub.links is None:
        return None
    try:
        fields = await _auth_fields(request)
    except ValidationException:
        return None
    return fields if wire.is_tracking_link(fields.get("channel_name", "")) else None


async def _tracking_link_auth(
    request: Request[Any, Any, Any], pusher: PusherContext, fields: dict[str, str]
) -> Response[bytes]:
    """Sign a tracking-link channel for the link session in the bearer header, and tell the socket's
    relay instance which session it uses (:meth:`LinkChannels.note_grant`)."""
    links = pusher.hub.links
    assert links is not None
    socket_id, channel = fields.get("socket_id", ""), fields["channel_name"]
    if not _SOCKET_ID.fullmatch(socket_id):
        raise _bad_request("socket_id must be two integers joined by a dot, as the connection reported it", _CORS)
    app = _auth_app(pusher.hub, request.query_params, fields)
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise LinkAccessError(4001, "an 'Authorization: Bearer <session token>' header is required")
        session, link = await links.service.session_for(token.strip(), channel[len(wire.TRACKING_LINK_PREFIX) :])
    except LinkAccessError as exc:
        relay_metrics.AUTH_FAILURES.labels(reason="link_session").inc()
        body = {"error": exc.error, "code": exc.code, "message": exc.message}
        return Response(msgspec.json.encode(body), status_code=exc.status, media_type=_JSON, headers=_CORS)
    reply = {"auth": channel_auth(app.key, pusher.hub.secret_of(app), socket_id, channel)}
    await links.note_grant(socket_id, session.token_hash, link.uuid, session.expires_at)
    return _json(reply, _CORS)


@post("/broadcasting/auth", status_code=200, summary="Authorise a Pusher channel", security=[{"bearer": []}])
async def broadcasting_auth(request: Request[Any, Any, Any], pusher: NamedDependency[PusherContext]) -> Response[bytes]:
    """``{"auth": "key:signature"}`` (plus ``channel_data`` on presence channels) for a channel this
    bearer token may see; 401 for a bad token, 403 for a channel it may not see, 400 for a bad body.
    Tracking-link channels: see the module docstring."""
    link_fields = await _tracking_link_fields(request, pusher)
    if link_fields is not None:
        return await _tracking_link_auth(request, pusher, link_fields)
    claims = _claims(pusher, request.headers.get("authorization"))
    fields = await _auth_fields(request)
    socket_id, channel = fields.get("socket_id", ""), fields.get("channel_name", "")
    if not _SOCKET_ID.fullmatch(socket_id):
        raise _bad_request("socket_id must be two integers joined by a dot, as the connection reported it", _CORS)
    if not channel:
        raise _bad_request("channel_name is required", _CORS)
    app = _auth_app(pusher.hub, request.query_params, fields)
    await authorise_channel(pusher.store, claims, channel)
    secret = pusher.hub.secret_of(app)
    reply: dict[str, str]
    if wire.channel_kind(channel) == wire.PRESENCE:
        channel_data = presence_data(claims)  # whatever the client sent is ignored
        reply = {"auth": channel_auth(app.key, secret, socket_id, channel, channel_data), "channel_data": channel_data}
    else:
        reply = {"auth": channel_auth(app.key, secret, socket_id, channel)}
    pusher.hub.note_grant(socket_id, claims.jti, user_id=claims.sub)  # for revocation and terminate
    return _json(reply, _CORS)


@route("/broadcasting/auth", http_method=HttpMethod.OPTIONS, include_in_schema=False)
async def broadcasting_auth_preflight(request: Request[Any, Any, Any]) -> Response[None]:
    """CORS preflight: any origin, the headers the page asks for (Echo adds X-CSRF-TOKEN, X-Socket-ID, ...)."""
    asked = request.headers.get("access-control-request-headers")
    headers = {**_PREFLIGHT, "Access-Control-Allow-Headers": asked} if asked else _PREFLIGHT
    return Response(None, status_code=204, headers=headers)


# -- the HTTP API: signed requests ---------------------------------------------------------------------


def _query(request: Request[Any, Any, Any]) -> list[tuple[str, str]]:
    try:
        return parse_qsl(request.scope["query_string"].decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        raise _bad_request("the query string is not UTF-8") from None


async def _verified(
    request: Request[Any, Any, Any], pusher: PusherContext, app: PusherAppSettings | None
) -> tuple[PusherAppSettings, bytes, dict[str, str]]:
    """The app, the raw body and the query, once the request's signature checks out (401 otherwise)."""
    if app is None:
        raise NotFoundException(detail="no such Pusher app")
    params = _query(request)
    body = await request.body()
    try:
        verify_request(
            app.key, pusher.hub.secret_of(app), request.method, request.scope["path"], params, body, now=time.time()
        )
    except RequestAuthError as exc:
        log.info("pusher HTTP API %s %s refused: %s", request.method, request.scope["path"], exc.reason)
        raise NotAuthorizedException(detail=exc.message) from None
    return app, body, dict(params)


def _decoded(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise _bad_request(f"invalid body: {exc}") from None
    except msgspec.DecodeError:
        raise _bad_request("the body is not valid JSON") from None


def _checked_channel(channel: str) -> str:
    problem = wire.channel_name_problem(channel)
    if problem is not None:
        raise _bad_request(f"{problem}: {channel[: wire.MAX_CHANNEL_NAME]!r}")
    return channel


def _info(text: str | None) -> frozenset[str]:
    wanted = frozenset(a for a in (text or "").split(",") if a)
    unknown = wanted - _INFO_ATTRIBUTES
    if unknown:
        raise _bad_request(f"info attributes: user_count, subscription_count (not {', '.join(sorted(unknown))})")
    return wanted


def _trigger(event: _Event, channels: Sequence[str], max_data: int) -> _Trigger:
    """``event`` checked against the limits (400, or 413 for data over ``max_data`` bytes)."""
    if not event.name or len(event.name) > wire.MAX_EVENT_NAME:
        raise _bad_request(f"the event name must have 1 to {wire.MAX_EVENT_NAME} characters")
    if event.name.startswith(_RESERVED_EVENT_PREFIXES):
        raise _bad_request("event names starting with pusher: or pusher_internal: are reserved")
    if not 1 <= len(channels) <= MAX_CHANNELS_PER_EVENT:
        raise _bad_request(f"an event goes to 1 to {MAX_CHANNELS_PER_EVENT} channels")
    if len(event.data.encode()) > max_data:
        raise ClientException(status_code=413, detail=f"event data is limited to {max_data} bytes")
    if event.socket_id is not None and not _SOCKET_ID.fullmatch(event.socket_id):
        raise _bad_request("socket_id must be two integers joined by a dot")
    return _Trigger(event.name, [_checked_channel(c) for c in channels], event.data, event.socket_id, _info(event.info))


async def _attributes(hub: PusherHub, app_id: str, channels: Iterable[str], wanted: frozenset[str]) -> dict[str, Any]:
    """``{channel: {attribute: value}}`` for the ``info`` of a trigger (user_count on presence channels only)."""
    out: dict[str, Any] = {}
    for channel in channels:
        info = await hub.channel_info(app_id, channel)
        out[channel] = {a: info[a] for a in sorted(wanted) if a in info}
    return out


async def _publish(hub: PusherHub, app_id: str, event: _Trigger) -> dict[str, Any]:
    await hub.trigger(app_id, event.channels, event.name, event.data, socket_id=event.socket_id)
    return await _attributes(hub, app_id, event.channels, event.info) if event.info else {}


@post("/apps/{app_id:str}/events", status_code=200, summary="Trigger an event")
async def trigger_event(
    request: Request[Any, Any, Any], pusher: NamedDependency[PusherContext], app_id: FromPath[str]
) -> Response[bytes]:
    """``{}``, or ``{"channels": {...}}`` with the ``info`` asked for."""
    app, body, _ = await _verified(request, pusher, pusher.hub.app_by_id(app_id))
    data: EventBody = _decoded(body, EventBody)
    channels = data.channels if data.channels is not None else [data.channel] if data.channel is not None else []
    attributes = await _publish(pusher.hub, app.id, _trigger(data, channels, pusher.hub.max_message))
    return _json({"channels": attributes} if attributes else {})


@post("/apps/{app_id:str}/batch_events", status_code=200, summary="Trigger up to 10 events")
async def trigger_batch(
    request: Request[Any, Any, Any], pusher: NamedDependency[PusherContext], app_id: FromPath[str]
) -> Response[bytes]:
    """``{"batch": [attributes, ...]}``, one entry per event (``{}`` unless it asked for ``info``).

    Every event is checked before the first is triggered: a bad batch triggers nothing.
    """
    app, body, _ = await _verified(request, pusher, pusher.hub.app_by_id(app_id))
    data: BatchBody = _decoded(body, BatchBody)
    if len(data.batch) > MAX_BATCH:
        raise _bad_request(f"a batch holds at most {MAX_BATCH} events")
    events = [_trigger(e, [e.channel], pusher.hub.max_message) for e in data.batch]
    results = [await _publish(pusher.hub, app.id, e) for e in events]
    return _json({"batch": [r.get(e.channels[0], {}) for r, e in zip(results, events, strict=True)]})


@get("/apps/{app_id:str}/channels", summary="Occupied channels")
async def list_channels(
    request: Request[Any, Any, Any], pusher: NamedDependency[PusherContext], app_id: FromPath[str]
) -> Response[bytes]:
    """``{"channels": {name: {}}}`` (with ``user_count`` when ``info=user_count`` and the prefix is presence-)."""
    app, _, query = await _verified(request, pusher, pusher.hub.app_by_id(app_id))
    prefix = query.get("filter_by_prefix", "")
    wanted = _info(query.get("info"))
    if "user_count" in wanted and not prefix.startswith("presence-"):
        raise _bad_request("info=user_count needs filter_by_prefix=presence-")
    counts = await pusher.hub.channels(app.id, prefix)
    channels: dict[str, dict[str, int]] = {}
    for name in sorted(counts):
        attributes = {"subscription_count": counts[name]} if "subscription_count" in wanted else {}
        if "user_count" in wanted:
            attributes["user_count"] = (await pusher.hub.channel_info(app.id, name)).get("user_count", 0)
        channels[name] = attributes
    return _json({"channels": channels})


@get("/apps/{app_id:str}/channels/{channel:str}", summary="One channel")
async def channel_info(
    request: Request[Any, Any, Any],
    pusher: NamedDependency[PusherContext],
    app_id: FromPath[str],
    channel: FromPath[str],
) -> Response[bytes]:
    """``{"occupied": bool}`` plus the ``info`` attributes asked for (user_count: presence channels only)."""
    app, _, query = await _verified(request, pusher, pusher.hub.app_by_id(app_id))
    _checked_channel(channel)
    wanted = _info(query.get("info"))
    if "user_count" in wanted and wire.channel_kind(channel) != wire.PRESENCE:
        raise _bad_request("user_count is only available on presence channels")
    info = await pusher.hub.channel_info(app.id, channel)
    return _json({"occupied": bool(info.get("occupied")), **{a: info.get(a, 0) for a in sorted(wanted)}})


@get("/apps/{app_id:str}/channels/{channel:str}/users", summary="Members of a presence channel")
async def channel_users(
    request: Request[Any, Any, Any],
    pusher: NamedDependency[PusherContext],
    app_id: FromPath[str],
    channel: FromPath[str],
) -> Response[bytes]:
    app, _, _ = await _verified(request, pusher, pusher.hub.app_by_id(app_id))
    if wire.channel_kind(channel) != wire.PRESENCE:
        raise _bad_request("users are listed for presence channels only")
    _checked_channel(channel)
    users = await pusher.hub.users(app.id, channel)
    return _json({"users": [{"id": u} for u in users]})


async def _terminate(hub: PusherHub, app: PusherAppSettings, user_id: str) -> Response[bytes]:
    if not 1 <= len(user_id) <= wire.MAX_USER_ID:
        raise _bad_request(f"user ids have 1 to {wire.MAX_USER_ID} characters")
    await hub.terminate_user(app.id, user_id)
    return _json({})


@post("/apps/{app_id:str}/users/{user_id:str}/terminate_connections", status_code=200, summary="Disconnect a user")
async def terminate_connections(
    request: Request[Any, Any, Any],
    pusher: NamedDependency[PusherContext],
    app_id: FromPath[str],
    user_id: FromPath[str],
) -> Response[bytes]:
    """Closes every connection of ``user_id`` (the ``sub`` of the token it authorised with); ``{}``."""
    app, _, _ = await _verified(request, pusher, pusher.hub.app_by_id(app_id))
    return await _terminate(pusher.hub, app, user_id)


@post("/users/{user_id:str}/terminate_connections", status_code=200, summary="Disconnect a user (no app in the path)")
async def terminate_connections_by_key(
    request: Request[Any, Any, Any], pusher: NamedDependency[PusherContext], user_id: FromPath[str]
) -> Response[bytes]:
    """As above, for pusher-http-python 3.3, which leaves ``/apps/{id}`` out: the signing key names the app."""
    key = dict(_query(request)).get("auth_key", "")
    app = pusher.hub.app_by_key(key)
    if app is None:
        raise NotAuthorizedException(detail="auth_key is not the key of any app")
    app, _, _ = await _verified(request, pusher, app)
    return await _terminate(pusher.hub, app, user_id)


# -- the routes, for relay.rest.create_app ----------------------------------------------------------------


def pusher_routes(ctx: RestContext) -> list[Router]:
    """The routes above over ``ctx`` (whose ``pusher`` hub must be set), for ``create_app`` to include."""
    assert ctx.pusher is not None
    pusher = PusherContext(hub=ctx.pusher, verifier=ctx.verifier, control=ctx.control, store=ctx.store)
    dependencies = {"pusher": Provide(lambda: pusher, sync_to_thread=False)}
    auth = Router(
        path="/",
        # The preflight first: registered after the POST, it would lose to Litestar's automatic OPTIONS handler.
        route_handlers=[broadcasting_auth_preflight, broadcasting_auth],
        dependencies=dependencies,
        tags=["pusher"],
    )
    api = Router(
        path="/",
        route_handlers=[
            trigger_event,
            trigger_batch,
            list_channels,
            channel_info,
            channel_users,
            terminate_connections,
            terminate_connections_by_key,
        ],
        dependencies=dependencies,
        request_max_body_size=API_MAX_BODY_BYTES,
        tags=["pusher"],
    )
    return [auth, api]
