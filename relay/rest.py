"""The REST service (port 8000): health, metrics, the OpenAPI schema and the admin API.

Litestar on uvicorn, served inside the host's event loop (:func:`start_rest`).
uvicorn would otherwise install its own SIGINT/SIGTERM handlers for the life
of the server and take the host process's shutdown away from it, so
:class:`_EmbeddedServer` leaves signals alone; nor does either library touch
the host's logging configuration.

Endpoints::

    GET  /healthz                       ctx.health() as JSON: 200 when status is "ok", else 503
    GET  /metrics                       the Prometheus registry (text format 0.0.4)
    GET  /schema/openapi.json           OpenAPI (also /schema for a browser)
    /api/admin/...                      admin tokens only (Authorization: Bearer <jwt>)
         GET    devices[?company=C]     list, ordered by IMEI
         GET    devices/{imei}
         PUT    devices/{imei}          create (201) or replace (200)
         POST   devices                 the same, IMEI in the body
         DELETE devices/{imei}          204, 404 when absent
         GET    limits                  {"default": N, "companies": {company: cap}}
         PUT    companies/{c}/limit     {"max_connections": N}: override the configured cap
         DELETE companies/{c}/limit     back to the configured cap
         POST   revocations             {"jti": ..., "exp": ...}: 202, sockets using it are closed
    POST /broadcasting/auth, /apps/{id}/...   the Pusher protocol's HTTP half (relay.pusher_http), when
                                        the relay serves Pusher: channel auth and the signed HTTP API
    /api/tracking-links, /api/public/tracking-links/...   tracking links (relay.links.rest), when the
                                        relay serves links: management (office/admin tokens), public flow

Tenancy: an admin token whose ``company`` is ``*`` manages every company (the
platform operator); any other admin token manages its own company only. Another
company's device answers 404 as if it did not exist (a write to it 409). Only a
platform operator changes connection limits (a company admin reads its own):
the cap protects the other tenants.

Every error is JSON ``{"error": <Name>, "message": <text>}``, mapped from
exceptions in one place (:data:`_EXCEPTION_HANDLERS`); messages are ours, never
an exception's text, so no internals reach a client. A store or control-channel
failure answers 503 ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import uvicorn
from litestar import Litestar, Request, Response, Router, delete, get, post, put
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.types import ExceptionHandlersMap
from redis.exceptions import RedisError

from gateway import metrics
from gateway.records import Device
from gateway.state.base import StateStore
from relay.bearer import Guard, role_guard
from relay.control import Control, ControlError
from relay.links.api import LinkAccessError, LinkRequestError
from relay.links.mail import MailError
from relay.links.rest import link_routes
from relay.links.service import LinkService  # at run time, as PusherHub
from relay.links.store import LinkStoreError
from relay.pusher import PusherHub  # at run time: Litestar resolves RestContext's annotations per request
from relay.pusher_http import pusher_routes
from relay.pusher_state import PusherStateError
from relay.ratelimit import RateLimited, RateLimiterError
from relay.settings import RelaySettings
from relay.tokens import Claims, TokenVerifier

__all__ = ["RestContext", "RestServer", "create_app", "start_rest"]

log = logging.getLogger(__name__)

ALL_COMPANIES = "*"  # the company claim of a platform operator's admin token
REVOCATION_DEFAULT_S = 24 * 3600.0  # a revocation without "exp" is kept this long
MAX_BODY_BYTES = 64 * 1024  # admin request bodies are a few hundred bytes
STOP_TIMEOUT_S = 5.0  # in-flight requests get this long at stop(); then they are cancelled

# The same checks as `fleetgate devices` (fleetgate/devices.py), which relay may not import:
# exactly 15 digits (what a GT06 login and a Teltonika handshake carry; Luhn not enforced),
# surrounding whitespace stripped, required text non-blank.
_IMEI = re.compile(r"[0-9]{15}")
_IMEI_PATTERN = "^[0-9]{15}$"
PROTOCOLS = ("gt06", "teltonika", "mqtt")

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Imei = Annotated[str, msgspec.Meta(pattern=_IMEI_PATTERN, description="15 digits")]


# -- context -------------------------------------------------------------------------


@dataclass
class RestContext:
    """What the REST service works with, built by the relay service."""

    store: StateStore
    control: Control
    verifier: TokenVerifier
    settings: RelaySettings
    health: Callable[[], dict[str, Any]]  # {"status": "ok", ...} answers 200, anything else 503
    pusher: PusherHub | None = None  # the Pusher protocol's hub: /broadcasting/auth and /apps/... (relay.pusher_http)
    links: LinkService | None = None  # tracking links: /api/tracking-links, /api/public/... (relay.links.rest)


# -- request and response bodies ----------------------------------------------------------


class _Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Client input: unknown fields are an error, not silently dropped (config is inherited, kw_only is not)."""


class DeviceBody(_Body, frozen=True, kw_only=True):
    """A registry entry, as ``fleetgate devices add`` takes it; ``protocol`` null accepts any protocol."""

    asset_id: _Id
    company_id: _Id
    display_name: Annotated[str, msgspec.Meta(max_length=256)] = ""
    speed_limit_kmh: Annotated[float, msgspec.Meta(gt=0)] | None = None
    protocol: Literal["gt06", "teltonika", "mqtt"] | None = None


class NewDevice(DeviceBody, frozen=True, kw_only=True):
    imei: _Imei


class LimitBody(_Body, frozen=True, kw_only=True):
    max_connections: Annotated[int, msgspec.Meta(ge=0)]


class RevocationBody(_Body, frozen=True, kw_only=True):
    jti: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    exp: Annotated[float, msgspec.Meta(gt=0, description="unix seconds; default now + 24 h")] | None = None


class DeviceView(msgspec.Struct, frozen=True, kw_only=True):
    """A registry entry with every field present (``Device`` itself omits defaults)."""

    imei: str
    asset_id: str
    company_id: str
    display_name: str
    speed_limit_kmh: float | None
    protocol: str | None

    @classmethod
    def of(cls, d: Device) -> DeviceView:
        return cls(
            imei=d.imei,
            asset_id=d.asset_id,
            company_id=d.company_id,
            display_name=d.display_name,
            speed_limit_kmh=d.speed_limit_kmh,
            protocol=d.protocol,
        )


class DeviceList(msgspec.Struct, frozen=True, kw_only=True):
    devices: list[DeviceView]


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    default: int
    companies: dict[str, int]


class CompanyLimit(msgspec.Struct, frozen=True, kw_only=True):
    company: str
    max_connections: int


class Revoked(msgspec.Struct, frozen=True, kw_only=True):
    jti: str
    exp: float
    revoked: bool = True


# -- authentication ---------------------------------------------------------------------


def _admin_guard(ctx: RestContext) -> Guard:
    return role_guard(ctx.verifier, ctx.control, ("admin",), "an admin token is required")


def _admin_claims(request: Request[Claims, Any, Any]) -> Claims:
    return request.user


def _scope(admin: Claims) -> str | None:
    """The one company this admin manages, or None for a platform operator (all companies)."""
    return None if admin.company == ALL_COMPANIES else admin.company


def _manages(admin: Claims, company: str) -> bool:
    return admin.company in (ALL_COMPANIES, company)


def _require_platform(admin: Claims) -> None:
    # A company's own admin must not lift the cap that protects the other tenants.
    if admin.company != ALL_COMPANIES:
        raise PermissionDeniedException(detail='only a platform admin (company "*") changes connection limits')


def _require_company(admin: Claims, company: str) -> None:
    if not _manages(admin, company):
        raise PermissionDeniedException(detail="this token manages its own company only")


# -- validation ------------------------------------------------------------------------


def _bad_request(message: str) -> ValidationException:
    return ValidationException(detail=message)


def _checked_imei(imei: str) -> str:
    imei = imei.strip()
    if not _IMEI.fullmatch(imei):
        raise _bad_request("imei must be exactly 15 digits")
    return imei


def _checked_text(value: str, name: str) -> str:
    value = value.strip()
    if not value:
        raise _bad_request(f"{name} must not be blank")
    return value


def _checked_company(company: str) -> str:
    company = _checked_text(company, "company")
    if company == ALL_COMPANIES or len(company) > 128:
        raise _bad_request("company must be a company id of at most 128 characters, not '*'")
    return company


def _device(imei: str, body: DeviceBody) -> Device:
    """The registry entry for a validated body, with the CLI's normalisation (stripped text)."""
    if body.speed_limit_kmh is not None and not math.isfinite(body.speed_limit_kmh):
        raise _bad_request("speed_limit_kmh must be a finite number of km/h")
    return Device(
        imei=_checked_imei(imei),
        asset_id=_checked_text(body.asset_id, "asset_id"),
        company_id=_checked_company(body.company_id),
        display_name=body.display_name.strip(),
        speed_limit_kmh=body.speed_limit_kmh,
        protocol=body.protocol,
    )


# -- operations endpoints ----------------------------------------------------------------

_JSON = "application/json"


@get("/healthz", tags=["operations"], summary="Health")
async def healthz(ctx: NamedDependency[RestContext]) -> Response[bytes]:
    """The process's health report: 200 when ``status`` is ``ok``, 503 otherwise."""
    try:
        report = ctx.health()
        body = msgspec.json.encode(report, enc_hook=str)
    except Exception:
        log.exception("health check failed")
        return Response(b'{"status":"error"}', status_code=503, media_type=_JSON)
    return Response(body, status_code=200 if report.get("status") == "ok" else 503, media_type=_JSON)


@get("/metrics", tags=["operations"], summary="Prometheus metrics")
async def prometheus_metrics() -> Response[bytes]:
    """The Prometheus text exposition of every ``fleetgate_*`` metric of this process."""
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


# -- admin: devices -------------------------------------------------------------------------


async def _visible_device(ctx: RestContext, admin: Claims, imei: str) -> Device:
    """The device, if this admin may see it; another company's device is reported as absent."""
    device = await ctx.store.get_device(imei)
    if device is None or not _manages(admin, device.company_id):
        raise NotFoundException(detail="no such device")
    return device


async def _save_device(ctx: RestContext, admin: Claims, device: Device) -> Response[DeviceView]:
    _require_company(admin, device.company_id)
    existing = await ctx.store.get_device(device.imei)
    if existing is not None and not _manages(admin, existing.company_id):
        raise HTTPException(status_code=409, detail="this IMEI is registered to another company")
    await ctx.store.put_device(device)
    return Response(DeviceView.of(device), status_code=200 if existing is not None else 201)


@get("/devices", summary="List devices")
async def list_devices(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], company: FromQuery[str | None] = None
) -> DeviceList:
    """Devices ordered by IMEI, of one company when ``company`` is given."""
    scope = _scope(admin)
    if company is not None and scope is not None and company != scope:
        raise PermissionDeniedException(detail="this token manages its own company only")
    devices = await ctx.store.list_devices(company if company is not None else scope)
    return DeviceList(devices=[DeviceView.of(d) for d in devices])


@get("/devices/{imei:str}", summary="Get a device")
async def get_device(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], imei: FromPath[str]
) -> DeviceView:
    return DeviceView.of(await _visible_device(ctx, admin, imei))


@put("/devices/{imei:str}", summary="Create or replace a device", status_code=200)
async def put_device(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], imei: FromPath[str], data: JSONBody[DeviceBody]
) -> Response[DeviceView]:
    """Registers the device, or replaces its entry: 201 when created, 200 when replaced."""
    return await _save_device(ctx, admin, _device(imei, data))


@post("/devices", summary="Create or replace a device (IMEI in the body)", status_code=201)
async def post_device(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], data: JSONBody[NewDevice]
) -> Response[DeviceView]:
    """As ``PUT /devices/{imei}``: 201 when created, 200 when an entry was replaced."""
    return await _save_device(ctx, admin, _device(data.imei, data))


@delete("/devices/{imei:str}", summary="Remove a device", status_code=204)
async def delete_device(ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], imei: FromPath[str]) -> None:
    # IMEIs are not format-checked here (nor by `fleetgate devices remove`): a malformed
    # entry, registered by a lax device handshake, must still be removable.
    await _visible_device(ctx, admin, imei)
    if not await ctx.store.remove_device(imei):
        raise NotFoundException(detail="no such device")


# -- admin: limits and revocations ------------------------------------------------------------


@get("/limits", summary="Connection limits per company")
async def get_limits(ctx: NamedDependency[RestContext], admin: NamedDependency[Claims]) -> Limits:
    """The configured default and per-company caps, overlaid with the overrides set through this API."""
    companies = {**ctx.settings.company_limits, **ctx.control.company_limits()}
    scope = _scope(admin)
    if scope is not None:
        companies = {c: n for c, n in companies.items() if c == scope}
    return Limits(default=ctx.settings.max_connections_per_company, companies=dict(sorted(companies.items())))


@put("/companies/{company:str}/limit", summary="Override a company's connection limit", status_code=200)
async def put_limit(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], company: FromPath[str], data: JSONBody[LimitBody]
) -> CompanyLimit:
    company = _checked_company(company)
    _require_platform(admin)
    await ctx.control.set_company_limit(company, data.max_connections)
    return CompanyLimit(company=company, max_connections=data.max_connections)


@delete("/companies/{company:str}/limit", summary="Return a company to its configured limit", status_code=204)
async def delete_limit(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], company: FromPath[str]
) -> None:
    company = _checked_company(company)
    _require_platform(admin)
    await ctx.control.set_company_limit(company, None)


@post("/revocations", summary="Revoke a token", status_code=202)
async def revoke_token(
    ctx: NamedDependency[RestContext], admin: NamedDependency[Claims], data: JSONBody[RevocationBody]
) -> Revoked:
    """Refuses the token with this ``jti`` from now on; sockets authenticated with it are closed.

    ``exp`` (the token's own expiry) bounds how long the revocation is kept.
    """
    exp = time.time() + REVOCATION_DEFAULT_S if data.exp is None else data.exp
    if not math.isfinite(exp):
        raise _bad_request("exp must be a finite number of unix seconds")
    await ctx.control.revoke(data.jti, exp)
    log.info("token revoked by admin %s of company %s", admin.sub, admin.company)
    return Revoked(jti=data.jti, exp=exp)


# -- errors: every exception mapped to a response here, and only here ----------------------------

_ERROR_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    500: "InternalError",
    503: "Unavailable",
}


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, name: str | None = None
) -> Response[dict[str, str]]:
    body = {"error": name or _ERROR_NAMES.get(status, "Error"), "message": message}
    return Response(body, status_code=status, headers=headers, media_type=_JSON)


def _validation_message(exc: ValidationException) -> str:
    """The field-level messages of a body or parameter that did not decode (msgspec's, naming the
    field), else our own detail."""
    problems = [p for p in exc.extra if isinstance(p, dict) and "message" in p] if isinstance(exc.extra, list) else []
    parts = [
        f"{p['key']}: {p['message']}" if p.get("key") not in (None, "data") else str(p["message"]) for p in problems
    ]
    return "; ".join(parts) or exc.detail


def _on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
    status = exc.status_code
    if status >= 500:  # Litestar's own server errors: the detail may describe internals
        log.error("REST: %s", exc)
        return _error(status, "internal error")
    message = _validation_message(exc) if isinstance(exc, ValidationException) else exc.detail
    headers = dict(exc.headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="fleetgate"'
    return _error(status, message, headers or None)


def _on_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    log.warning("REST %s %s: backend unavailable: %r", request.method, request.url.path, exc)
    return _error(503, "the state store or the control channel is unavailable; retry later")


def _on_mail_failed(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    log.warning("REST %s %s: mail not sent: %r", request.method, request.url.path, exc)
    return _error(503, "the verification mail could not be sent; retry later")


def _on_link_access(_: Request[Any, Any, Any], exc: LinkAccessError) -> Response[dict[str, Any]]:
    """A viewer refused: ``code`` is the one a WebSocket viewer gets as close code (relay.links.service)."""
    headers = {"WWW-Authenticate": 'Bearer realm="fleetgate-tracking-link"'} if exc.status == 401 else None
    body = {"error": exc.error, "code": exc.code, "message": exc.message}
    return Response(body, status_code=exc.status, headers=headers, media_type=_JSON)


def _on_link_request(_: Request[Any, Any, Any], exc: LinkRequestError) -> Response[dict[str, str]]:
    return _error(exc.status, exc.message, name=exc.error)


def _on_rate_limited(_: Request[Any, Any, Any], exc: RateLimited) -> Response[dict[str, str]]:
    return _error(429, "too many requests; retry later", {"Retry-After": exc.retry_after_header})


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    log.error("REST %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error")


_EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: _on_http_exception,
    ControlError: _on_unavailable,
    PusherStateError: _on_unavailable,  # the Pusher HTTP API's occupancy and presence reads
    LinkStoreError: _on_unavailable,
    RateLimiterError: _on_unavailable,
    MailError: _on_mail_failed,
    LinkAccessError: _on_link_access,
    LinkRequestError: _on_link_request,
    RateLimited: _on_rate_limited,
    RedisError: _on_unavailable,
    sqlite3.Error: _on_unavailable,
    OSError: _on_unavailable,
    Exception: _on_unexpected,
}


# -- the application -----------------------------------------------------------------------


def create_app(ctx: RestContext) -> Litestar:
    """The Litestar application over ``ctx``; serve it with :func:`start_rest`."""
    admin = Router(
        path="/api/admin",
        route_handlers=[
            list_devices,
            get_device,
            put_device,
            post_device,
            delete_device,
            get_limits,
            put_limit,
            delete_limit,
            revoke_token,
        ],
        guards=[_admin_guard(ctx)],
        dependencies={"admin": Provide(_admin_claims, sync_to_thread=False)},
        security=[{"bearer": []}],
        tags=["admin"],
    )
    openapi = OpenAPIConfig(
        title="fleetgate",
        version="1",
        path="/schema",
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
        ),
    )
    return Litestar(
        route_handlers=[
            healthz,
            prometheus_metrics,
            admin,
            *(pusher_routes(ctx) if ctx.pusher is not None else []),
            *(link_routes(ctx) if ctx.links is not None else []),
        ],
        dependencies={"ctx": Provide(lambda: ctx, sync_to_thread=False)},
        exception_handlers=_EXCEPTION_HANDLERS,
        openapi_config=openapi,
        cache_control=CacheControlHeader(no_store=True),
        request_max_body_size=MAX_BODY_BYTES,
        logging_config=None,  # the host process configures logging
        debug=False,
    )


# -- serving ------------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the host process owns SIGINT/SIGTERM and stops us itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RestServer:
    """A running REST server; :attr:`port` is the bound port (useful after asking for port 0)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close. Idempotent."""
        self._server.should_exit = True
        try:
            # uvicorn cancels requests still running after its timeout_graceful_shutdown;
            # the margin here only covers its own shutdown steps.
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s + 2.0)
        except TimeoutError:
            log.warning("REST server did not stop within %.0f s; cancelled", timeout_s + 2.0)
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _serve(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit:
        # uvicorn ends a failed startup (port in use, ...) with sys.exit() after logging the
        # cause; inside a task of the host's loop that would escape the loop and end the process.
        raise OSError("REST server failed to start (see the uvicorn.error log)") from None


async def start_rest(app: Litestar, host: str, port: int) -> RestServer:
    """Serve ``app`` on ``host:port`` (port 0: any free port) in the running loop; returns once listening.

    Raises ``OSError`` when the server cannot start (the cause is logged by uvicorn).
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level="warning",
        log_config=None,  # leave the host's logging configuration alone
        access_log=False,
        proxy_headers=False,  # rate limits key on the TCP peer: forwarding headers are not trusted by default
        server_header=False,
        timeout_graceful_shutdown=int(STOP_TIMEOUT_S),
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(_serve(server), name="fleetgate-rest")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises the startup failure
                raise OSError("REST server exited during startup")
            await asyncio.sleep(0.005)
    except asyncio.CancelledError:
        task.cancel()  # the host gave up on starting us: leave no server task behind
        raise
    sockets = server.servers[0].sockets
    return RestServer(server, task, sockets[0].getsockname()[1] if sockets else port)
