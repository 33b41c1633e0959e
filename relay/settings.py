"""The relay's settings: every limit a named value with a safe default.

Loaded by :mod:`fleetgate.config` as the ``[relay]`` and ``[auth]`` sections of
the one configuration file (``FLEETGATE_RELAY__*`` / ``FLEETGATE_AUTH__*``
environment overrides).
"""

from __future__ import annotations

from typing import Literal

import msgspec


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class RelaySettings(_Section):
    enabled: bool = True  # fleetgate run: also start the relay in the same process
    host: str = "0.0.0.0"  # WebSocket and REST listeners
    ws_port: int = 8080  # native protocol at /ws (Pusher protocol at /app/{key})
    rest_port: int = 8000  # REST API, /metrics, /healthz, OpenAPI at /schema
    public_url: str = ""  # how clients reach the WebSocket port (printed and returned); default ws://HOST:PORT
    instance_id: str = ""  # distinguishes relay instances on one Redis; default hostname:pid
    auth_timeout_s: float = 10.0  # a socket that has not authenticated by then is closed (4001)
    ping_interval_s: float = 20.0  # a WebSocket ping frame to a socket quiet for this long
    ping_timeout_s: float = 20.0  # no pong (or any data) within this after a ping: close (4010; Pusher 4201)
    max_message: int = 16 * 1024  # larger client messages close the socket with 1009
    send_buffer_max: int = 1024 * 1024  # bytes queued toward one client; beyond it the client is dropped (4008)
    flush_interval_ms: float = 5.0  # fan-out frames for one socket within this window go out in one write
    driver_min_interval_s: float = 1.0  # at most one accepted driver location per this interval
    max_connections_per_company: int = 10_000  # per relay instance; admin API and company_limits override
    company_limits: dict[str, int] = msgspec.field(default_factory=dict)  # company id -> connection cap
    max_connections: int = 100_000  # WebSocket connections in total on this instance


class AuthSettings(_Section):
    """JWT access tokens: HS256 with ``secret``, or RS256/ES256 with ``public_key_file`` or ``jwks_file``."""

    secret: str = ""  # HS256 secret; empty: read secret_file (created with a random secret when missing)
    secret_file: str = "fleetgate.secret"  # used when secret is empty, so `fleetgate token` and `run` agree
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    public_key_file: str = ""  # PEM public key for RS256/ES256
    jwks_file: str = ""  # JSON Web Key Set file; the token's "kid" selects the key
    issuer: str = ""  # checked when set ("iss")
    audience: str = ""  # checked when set ("aud")
    leeway_s: float = 0.0  # clock skew allowed on exp/nbf


class PusherAppSettings(_Section):
    """One Pusher app: clients connect to ``/app/{key}``; the HTTP API signs with ``secret``."""

    id: str = "1"  # numeric: the official Python server library requires it
    key: str = "fleetgate"
    secret: str = ""  # empty: derived from the [auth] secret (stable across restarts, never printed)
    name: str = "fleetgate"
    max_connections: int = 100_000  # on this relay instance; beyond: pusher:error 4004 and close
    enable_client_messages: bool = False  # client-* events on private/presence channels
    max_client_events_per_s: int = 10  # beyond: pusher:error 4301


class PusherSettings(_Section):
    enabled: bool = True
    apps: list[PusherAppSettings] = msgspec.field(default_factory=lambda: [PusherAppSettings()])
    activity_timeout_s: int = 30  # sent in pusher:connection_established: clients ping after this much silence
    pong_timeout_s: float = 30.0  # a quiet socket is pinged ([relay] ping_interval_s); no pong by then: 4201
    max_message: int = 10 * 1024  # client messages and event data (bytes)
    batch_window_ms: int = 100  # location records for one channel within this window go out as one array event


class LinkSettings(_Section):
    """Public tracking links: e-mail, geocoding and the limits that protect the public endpoints."""

    enabled: bool = True
    smtp_host: str = ""  # empty: verification codes are written to the log (embedded demo)
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    mail_from: str = "fleetgate@localhost"
    geocoder_url: str = ""  # Nominatim-compatible base URL for street-level addresses; empty: offline town table
    geocoder_user_agent: str = "fleetgate"
    verify_per_minute_per_ip: int = 30  # POST .../verify; beyond: 429 with Retry-After
    poll_per_minute_per_session: int = 60  # GET .../location; beyond: 429 with Retry-After
    ws_connections_per_ip: int = 100  # Pusher-protocol sockets from one address; beyond: pusher:error 4100
    channel_messages_per_s: float = 10.0  # per link channel; faster positions are coalesced to the latest
    speed_window_s: float = 600.0  # ETA uses the average moving speed over this recent window
