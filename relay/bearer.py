"""Bearer access tokens on the REST service: one place that reads, verifies and refuses them.

Used by the admin API (:mod:`relay.rest`), the tracking-link management API
(:mod:`relay.links.rest`) and channel authorisation (:mod:`relay.pusher_http`).
A refusal is a 401 whose message says why in general terms (missing, expired,
revoked, otherwise "not valid") and is counted by reason in
``fleetgate_auth_failures_total``; a valid token of the wrong role is a 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from relay import metrics
from relay.control import Control
from relay.tokens import Claims, TokenError, TokenVerifier

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]

_MESSAGES = {
    "missing": "an 'Authorization: Bearer <token>' header is required",
    "expired": "the token has expired",
    "revoked": "the token has been revoked",
}


def unauthorized(reason: str, headers: Mapping[str, str] | None = None) -> NotAuthorizedException:
    """The 401 for a refused token, counted under ``reason``."""
    metrics.AUTH_FAILURES.labels(reason=reason).inc()
    detail = _MESSAGES.get(reason, "the token is not valid")
    return NotAuthorizedException(detail=detail, headers=dict(headers) if headers is not None else None)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def verified_claims(
    verifier: TokenVerifier, control: Control, header: str | None, *, headers: Mapping[str, str] | None = None
) -> Claims:
    """The verified, unrevoked claims of the request's bearer token; else the 401."""
    token = bearer(header)
    if token is None:
        raise unauthorized("missing", headers)
    try:
        claims = verifier.verify(token)
    except TokenError as exc:
        raise unauthorized(exc.reason, headers) from None
    if control.is_revoked(claims.jti):
        raise unauthorized("revoked", headers)
    return claims


def role_guard(verifier: TokenVerifier, control: Control, roles: Collection[str], denied: str) -> Guard:
    """A guard admitting verified, unrevoked tokens of ``roles``; it leaves the claims in ``scope["user"]``.

    A guard rather than a dependency because guards run before the body is read: a caller
    without a valid token learns nothing about what a valid request would look like. Async
    although it never awaits: Litestar runs synchronous guards in a worker thread.
    """

    async def require(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        claims = verified_claims(verifier, control, connection.headers.get("authorization"))
        if claims.role not in roles:
            metrics.AUTH_FAILURES.labels(reason="role_mismatch").inc()
            raise PermissionDeniedException(detail=denied)
        connection.scope["user"] = claims

    return require
