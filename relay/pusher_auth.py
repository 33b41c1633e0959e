"""Pusher signatures (pure functions): channel authorisation and app secrets.

Channel auth (Pusher "auth signatures"): ``auth = "{key}:{hex(HMAC-SHA256(secret, string_to_sign))}"``
where ``string_to_sign`` is ``"{socket_id}:{channel}"``, or
``"{socket_id}:{channel}:{channel_data}"`` for presence channels, with
``channel_data`` the exact string the auth endpoint returned (never
re-serialised before verifying).
"""

from __future__ import annotations

import hashlib
import hmac

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
