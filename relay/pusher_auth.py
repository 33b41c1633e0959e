"""Pusher signatures (pure functions): channel authorisation, HTTP API request signing, app secrets.

Channel auth (Pusher "auth signatures"): ``auth = "{key}:{hex(HMAC-SHA256(secret, string_to_sign))}"``
where ``string_to_sign`` is ``"{socket_id}:{channel}"``, or
``"{socket_id}:{channel}:{channel_data}"`` for presence channels, with
``channel_data`` the exact string the auth endpoint returned (never
re-serialised before verifying).

HTTP API requests (auth_version 1.0, pusher.md section 6.1): the query carries
``auth_key``, ``auth_timestamp``, ``auth_version``, ``body_md5`` (hex MD5 of a
non-empty body) and ``auth_signature = hex(HMAC-SHA256(secret,
"{METHOD}\\n{path}\\n{canonical query}"))``, where the canonical query is every
parameter but ``auth_signature``, keys lower-cased, sorted by key, joined as
``k=v`` with ``&`` and *not* URL-escaped. No clock is read here: ``now`` is an
argument.

Exceptions::

    RequestAuthError (reason: missing_param | wrong_key | bad_version | bad_timestamp
                      | stale_timestamp | body_md5_mismatch | invalid_signature)
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping

from relay.settings import PusherAppSettings


def channel_signature(secret: str, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """Hex HMAC-SHA256 of the channel auth string."""
    message = f"{socket_id}:{channel}" if channel_data is None else f"{socket_id}:{channel}:{channel_data}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def channel_auth(key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """The ``auth`` value a client presents in ``pusher:subscribe``: ``"key:signature"``."""
    return f"{key}:{channel_signature(secret, socket_id, channel, channel_data)}"


def verify_channel_auth(
    key: str, secret: str, auth: str, socket_id: str, channel: str, channel_data: str | None = None
) -> bool:
    """True when ``auth`` is ``key:signature`` for this socket and channel (constant-time comparison)."""
    expected = channel_auth(key, secret, socket_id, channel, channel_data)
    return hmac.compare_digest(auth.encode(), expected.encode())


def app_secret(app: PusherAppSettings, auth_secret: str) -> str:
    """The app's secret: configured, or derived from the [auth] secret so it is stable and needs no setup."""
    if app.secret:
        return app.secret
    return hmac.new(auth_secret.encode(), f"pusher-app:{app.id}".encode(), hashlib.sha256).hexdigest()


# -- HTTP API request signing (pusher.md section 6.1) -------------------------------------------

AUTH_VERSION = "1.0"
MAX_TIMESTAMP_SKEW_S = 600.0  # |now - auth_timestamp| beyond this is refused (REST limits, section 5)


class RequestAuthError(Exception):
    """A signed HTTP API request that must be refused (401); ``reason`` is a stable slug for logs and metrics.

    The message is meant for the caller: it says what is wrong without echoing the expected signature.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def body_md5(body: bytes) -> str:
    """Lower-case hex MD5 of a request body, as ``body_md5`` carries it (a checksum, not a security hash)."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """The signed form of a decoded query: keys lower-cased, sorted by key, ``k=v`` joined by ``&``, unescaped.

    ``auth_signature`` is left out. Repeated keys (``channels[]=a&channels[]=b``) keep their order.
    """
    pairs = [(k.lower(), v) for k, v in params if k.lower() != "auth_signature"]
    pairs.sort(key=lambda pair: pair[0])  # stable: repeated keys stay in the order they came
    return "&".join(f"{k}={v}" for k, v in pairs)


def request_signature(secret: str, method: str, path: str, params: Iterable[tuple[str, str]]) -> str:
    """Hex HMAC-SHA256 of ``"{METHOD}\\n{path}\\n{canonical query}"``."""
    message = f"{method.upper()}\n{path}\n{canonical_query(params)}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign_request(
    key: str, secret: str, method: str, path: str, params: Mapping[str, str], body: bytes, *, now: float
) -> dict[str, str]:
    """``params`` plus the auth parameters and ``auth_signature``: the query of a signed request.

    What the official server libraries do; used by tests and by anyone scripting the API by hand.
    """
    signed = {**params, "auth_key": key, "auth_timestamp": str(int(now)), "auth_version": AUTH_VERSION}
    if body:
        signed["body_md5"] = body_md5(body)
    signed["auth_signature"] = request_signature(secret, method, path, signed.items())
    return signed


def verify_request(
    key: str,
    secret: str,
    method: str,
    path: str,
    params: list[tuple[str, str]],
    body: bytes,
    *,
    now: float,
    max_skew_s: float = MAX_TIMESTAMP_SKEW_S,
) -> None:
    """Raise :class:`RequestAuthError` unless the decoded query ``params`` sign this request for app ``key``.

    Checks, cheapest first: the auth parameters are present once each, ``auth_key`` is this app's,
    ``auth_version`` is 1.0, ``auth_timestamp`` is within ``max_skew_s`` of ``now``, ``body_md5``
    matches a non-empty body (and, when sent with an empty one, as pusher-http-python does on GET,
    the MD5 of nothing), and the signature (constant-time comparison).
    """
    auth = _auth_params(params)
    if not hmac.compare_digest(auth["auth_key"].encode(), key.encode()):
        raise RequestAuthError("wrong_key", "auth_key is not the key of this app")
    if auth["auth_version"] != AUTH_VERSION:
        raise RequestAuthError("bad_version", f"auth_version must be {AUTH_VERSION}")
    try:
        timestamp = float(auth["auth_timestamp"])
    except ValueError:
        timestamp = math.nan
    if not math.isfinite(timestamp):
        raise RequestAuthError("bad_timestamp", "auth_timestamp must be unix seconds")
    if abs(now - timestamp) > max_skew_s:
        raise RequestAuthError(
            "stale_timestamp", f"auth_timestamp is more than {max_skew_s:.0f} s away from the server's clock"
        )
    md5 = auth.get("body_md5")
    if (body or md5 is not None) and md5 != body_md5(body):
        raise RequestAuthError("body_md5_mismatch", "body_md5 is missing or does not match the body")
    expected = request_signature(secret, method, path, params)
    if not hmac.compare_digest(auth["auth_signature"].encode(), expected.encode()):
        raise RequestAuthError("invalid_signature", "auth_signature does not match the request")


_REQUIRED_AUTH_PARAMS = ("auth_key", "auth_timestamp", "auth_version", "auth_signature")


def _auth_params(params: list[tuple[str, str]]) -> dict[str, str]:
    """The auth_* parameters and body_md5, each at most once; the four required ones present."""
    auth: dict[str, str] = {}
    for k, v in params:
        name = k.lower()
        if name in _REQUIRED_AUTH_PARAMS or name == "body_md5":
            if name in auth:
                raise RequestAuthError("missing_param", f"{name} is given more than once")
            auth[name] = v
    missing = [name for name in _REQUIRED_AUTH_PARAMS if name not in auth]
    if missing:
        raise RequestAuthError("missing_param", f"the query lacks {', '.join(missing)}")
    return auth
