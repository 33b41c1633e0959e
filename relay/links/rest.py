"""The REST half of tracking links: the management API (office and admin tokens) and the public flow.

Endpoints (included by :func:`relay.rest.create_app` when the relay serves links)::

    /api/tracking-links                      Authorization: Bearer <access token>, role office or admin
        POST                                 create: 201 with the link
        GET    [?company=C]                  the company's links, newest first
        GET    /{uuid}                       one link
        PATCH  /{uuid}                       change the fields present (null clears an optional one)
        DELETE /{uuid}                       204; its sessions end and its viewers are disconnected
    /api/public/tracking-links/{uuid}        no account (CORS: any origin)
        GET                                  {"access_mode", "status", "display_name"[, "next_change"]}
        POST   /verify                       see LinkService.verify: 200 {"session_token", "expires_at",
                                             "channel", "ws_url", "app_key"} or 202 {"code_sent": true}
        GET    /location                     Authorization: Bearer <session token>: the viewer's payload
                                             (as the WebSocket event), 204 before the first position

Tenancy as in the admin API: a token manages its own company's links; an admin token of company
``*`` (the platform operator) manages every company's and names the company (``company_id`` in the
body, ``?company=`` on the list). Another company's link answers 404, as if it did not exist.

The session token travels in the ``Authorization`` header only, never in the URL: URLs end up in
access logs, proxies and browser histories.

Limits: ``verify`` counts ``[links] verify_per_minute_per_ip`` per client address (the TCP peer,
``request.client.host``; behind a reverse proxy that is the proxy, so run uvicorn with
``proxy_headers`` and ``forwarded_allow_ips`` there), before the body is read; ``location`` counts
``poll_per_minute_per_session`` per session token. Beyond: 429 with ``Retry-After`` (seconds).

Errors are raised here and turned into JSON by :mod:`relay.rest`, in one place: a viewer's access
errors as ``{"error", "code", "message"}`` with the 4001-4005 codes of :mod:`relay.links.service`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response, Router, delete, get, patch, post, route
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.enums import HttpMethod
from litestar.exceptions import PermissionDeniedException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from relay.bearer import Guard, bearer, role_guard
from relay.links.api import CodeSent, LinkAccessError, LinkPatch, NewLink, PublicInfo, SessionGrant
from relay.links.model import AccessMode, Arrival, ExpiredReason, Schedule, Status, TrackingLink
from relay.links.service import LinkService
from relay.tokens import Claims, TokenVerifier

if TYPE_CHECKING:
    from relay.control import Control
    from relay.rest import RestContext

__all__ = ["link_routes"]

ALL_COMPANIES = "*"
MANAGING_ROLES = ("office", "admin")
PUBLIC_PREFIX = "/api/public/tracking-links"
PUBLIC_MAX_BODY_BYTES = 4 * 1024  # {"email", "code"} is well under 300 bytes

_JSON = "application/json"
_encode = msgspec.json.Encoder().encode


# -- views ------------------------------------------------------------------------------------------


class LinkView(msgspec.Struct, frozen=True, kw_only=True):
    """A link as its company sees it (every field present), with its status and the public API path."""

    uuid: str
    company_id: str
    asset_id: str
    job_id: str | None
    display_name: str
    access_mode: AccessMode
    allowed_emails: list[str]
    expires_at: datetime | None
    arrival: Arrival | None
    schedule: Schedule | None
    session_ttl_s: int
    enabled: bool
    created_at: datetime
    updated_at: datetime
    expired_at: datetime | None
    expired_reason: ExpiredReason | None
    status: Status
    public_url: str

    @classmethod
    def of(cls, link: TrackingLink, status: Status) -> LinkView:
        return cls(
            uuid=link.uuid,
            company_id=link.company_id,
            asset_id=link.asset_id,
            job_id=link.job_id,
            display_name=link.display_name,
            access_mode=link.access_mode,
            allowed_emails=list(link.allowed_emails),
            expires_at=link.expires_at,
            arrival=link.arrival,
            schedule=link.schedule,
            session_ttl_s=link.session_ttl_s,
            enabled=link.enabled,
            created_at=link.created_at,
            updated_at=link.updated_at,
            expired_at=link.expired_at,
            expired_reason=link.expired_reason,
            status=status,
            public_url=f"{PUBLIC_PREFIX}/{link.uuid}",
        )


class LinkList(msgspec.Struct, frozen=True, kw_only=True):
    links: list[LinkView]


class VerifyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    email: str | None = None
    code: str | None = None


_decode_verify = msgspec.json.Decoder(VerifyBody).decode


def _view(links: LinkService, link: TrackingLink) -> LinkView:
    return LinkView.of(link, links.status(link))


# -- the management API: authentication and scope ----------------------------------------------------


def _manager_guard(verifier: TokenVerifier, control: Control) -> Guard:
    """Office and admin tokens (see :func:`relay.bearer.role_guard`); only an admin may act for every company."""
    admit = role_guard(verifier, control, MANAGING_ROLES, "an office or admin token is required")

    async def require_manager(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        await admit(connection, handler)
        claims = connection.scope["user"]
        if claims.company == ALL_COMPANIES and claims.role != "admin":
            raise PermissionDeniedException(detail='only an admin token may act for every company ("*")')

    return require_manager


def _caller(request: Request[Claims, Any, Any]) -> Claims:
    return request.user


def _scope(caller: Claims) -> str | None:
    """The one company this token manages, or None for a platform operator (every company)."""
    return None if caller.company == ALL_COMPANIES else caller.company


def _company_for(caller: Claims, named: str | None) -> str:
    """The company a request acts for: the token's own, or the one a platform operator names."""
    scope = _scope(caller)
    if scope is None:
        if named is None or not named.strip() or named.strip() == ALL_COMPANIES:
            raise ValidationException(detail="a platform admin token must name the company (company_id / ?company=)")
        return named.strip()
    if named is not None and named != scope:
        raise PermissionDeniedException(detail="this token manages its own company's links only")
    return scope


# -- the management API: handlers --------------------------------------------------------------------


@post("/", summary="Create a tracking link", status_code=201)
async def create_link(
    links: NamedDependency[LinkService], caller: NamedDependency[Claims], data: JSONBody[NewLink]
) -> LinkView:
    link = await links.create(_company_for(caller, data.company_id), data)
    return _view(links, link)


@get("/", summary="List tracking links")
async def list_links(
    links: NamedDependency[LinkService], caller: NamedDependency[Claims], company: FromQuery[str | None] = None
) -> LinkList:
    """The company's links, newest first."""
    found = await links.list_links(_company_for(caller, company))
    return LinkList(links=[_view(links, link) for link in found])


@get("/{uuid:str}", summary="Get a tracking link")
async def get_link(
    links: NamedDependency[LinkService], caller: NamedDependency[Claims], uuid: FromPath[str]
) -> LinkView:
    return _view(links, await links.managed_link(uuid, _scope(caller)))


@patch("/{uuid:str}", summary="Change a tracking link")
async def patch_link(
    links: NamedDependency[LinkService],
    caller: NamedDependency[Claims],
    uuid: FromPath[str],
    data: JSONBody[LinkPatch],
) -> LinkView:
    """Changes the fields present. Disabling, or changing ``access_mode`` / ``allowed_emails``, ends the
    link's sessions; moving it to another ``asset_id`` tells its viewers ``vehicle.changed``."""
    link = await links.managed_link(uuid, _scope(caller))
    return _view(links, await links.update(link, data))


@delete("/{uuid:str}", summary="Delete a tracking link", status_code=204)
async def delete_link(
    links: NamedDependency[LinkService], caller: NamedDependency[Claims], uuid: FromPath[str]
) -> None:
    await links.delete(await links.managed_link(uuid, _scope(caller)))


# -- the public flow -----------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(body), status_code=status, media_type=_JSON)


def _client(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client is not None else "unknown"


@get("/{uuid:str}", summary="A tracking link's access mode and status")
async def public_info(links: NamedDependency[LinkService], uuid: FromPath[str]) -> PublicInfo:
    return await links.info(uuid)


@post("/{uuid:str}/verify", summary="Open a viewer session", status_code=200)
async def public_verify(
    request: Request[Any, Any, Any], links: NamedDependency[LinkService], uuid: FromPath[str]
) -> Response[bytes]:
    """``public``: an empty body. ``email``: ``{"email"}``. ``email_code`` and ``authorized_only``:
    ``{"email"}`` mails a 6-digit code (202 ``{"code_sent": true}``, the same for every address),
    then ``{"email", "code"}``. Success: 200 with the session token and where to connect."""
    await links.limit_verify(_client(request))
    raw = await request.body()
    try:
        body = _decode_verify(raw) if raw.strip() else VerifyBody()
    except msgspec.ValidationError as exc:
        raise ValidationException(detail=f"invalid body: {exc}") from None
    except msgspec.DecodeError:
        raise ValidationException(detail="the body is not valid JSON") from None
    outcome: SessionGrant | CodeSent = await links.verify(uuid, body.email, body.code)
    return _json(outcome, 202 if isinstance(outcome, CodeSent) else 200)


@get("/{uuid:str}/location", summary="The vehicle's position (polling fallback)")
async def public_location(
    request: Request[Any, Any, Any], links: NamedDependency[LinkService], uuid: FromPath[str]
) -> Response[bytes]:
    """The payload of the WebSocket ``location.updated`` event, 204 while the vehicle has not reported."""
    token = bearer(request.headers.get("authorization"))
    if token is None:
        raise LinkAccessError(4001, "an 'Authorization: Bearer <session token>' header is required")
    location = await links.poll(uuid, token)
    if location is None:
        return Response(b"", status_code=204)
    return _json(location)


_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


@route(["/{uuid:str}", "/{uuid:str}/verify", "/{uuid:str}/location"], http_method=HttpMethod.OPTIONS)
async def public_preflight(uuid: FromPath[str]) -> Response[None]:
    """CORS preflight: the viewer's page is served from another origin than this API."""
    return Response(None, status_code=204, headers=_PREFLIGHT)


def _cors(app: ASGIApp) -> ASGIApp:
    """Every public response, errors included, may be read by a page of any origin.

    Safe because nothing here rides on cookies: the session token is sent explicitly.
    """

    async def with_cors(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", b"*"),
                    (b"access-control-expose-headers", b"Retry-After"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_cors)

    return with_cors


# -- the routes, for relay.rest.create_app -------------------------------------------------------------


def link_routes(ctx: RestContext) -> list[Router]:
    """The routes above over ``ctx`` (whose ``links`` service must be set)."""
    service = ctx.links
    assert service is not None
    dependencies = {"links": Provide(lambda: service, sync_to_thread=False)}
    manage = Router(
        path="/api/tracking-links",
        route_handlers=[create_link, list_links, get_link, patch_link, delete_link],
        guards=[_manager_guard(ctx.verifier, ctx.control)],
        dependencies={**dependencies, "caller": Provide(_caller, sync_to_thread=False)},
        security=[{"bearer": []}],
        tags=["tracking links"],
    )
    public = Router(
        path=PUBLIC_PREFIX,
        # The preflight first: registered after, it would lose to Litestar's automatic OPTIONS handler.
        route_handlers=[public_preflight, public_info, public_verify, public_location],
        dependencies=dependencies,
        middleware=[_cors],
        request_max_body_size=PUBLIC_MAX_BODY_BYTES,
        tags=["tracking links (public)"],
    )
    return [manage, public]
