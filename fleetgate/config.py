"""Whole-system configuration: one TOML file plus ``FLEETGATE_*`` environment overrides.

The file's tables are the sections of :class:`Config` (``[listeners]``,
``[limits]``, ``[bus]``, ...). An environment variable
``FLEETGATE_<SECTION>__<KEY>`` overrides one key, e.g.
``FLEETGATE_BUS__DRIVER=redis`` or ``FLEETGATE_LIMITS__IDLE_TIMEOUT_S=120``;
values are converted to the key's type. Unknown sections or keys are errors.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from gateway.settings import GatewaySettings
from relay.settings import AuthSettings, LinkSettings, PusherSettings, RelaySettings

ENV_PREFIX = "FLEETGATE_"


class Config(GatewaySettings, kw_only=True, forbid_unknown_fields=True):
    """Everything fleetgate reads from its configuration: the gateway's sections, then ``[relay]`` and ``[auth]``."""

    log_level: str = "info"
    relay: RelaySettings = msgspec.field(default_factory=RelaySettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    pusher: PusherSettings = msgspec.field(default_factory=PusherSettings)
    links: LinkSettings = msgspec.field(default_factory=LinkSettings)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says where and why."""


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (optional), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for name, value in (os.environ if environ is None else environ).items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: {key} is not a section")
        target[keys[-1]] = _env_value(value)
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"configuration: {exc}") from None


def _env_value(text: str) -> Any:
    """Environment values are strings; ``msgspec.convert(strict=False)`` turns them into ints, bools, floats."""
    if text.lower() in ("none", "null"):
        return None
    return text


EXAMPLE = """\
# fleetgate configuration. Every key is optional; shown values are the defaults.
# Any key can be overridden from the environment: FLEETGATE_<SECTION>__<KEY>,
# e.g. FLEETGATE_BUS__DRIVER=redis FLEETGATE_BUS__REDIS_URL=redis://10.0.0.5:6379/0

log_level = "info"

[listeners]
host = "0.0.0.0"          # where trackers connect
gt06_port = 5023          # GT06 / Concox over TCP
teltonika_port = 5027     # Teltonika over TCP
teltonika_udp_port = 5027 # Teltonika over UDP
gt06 = true
teltonika = true
teltonika_udp = true

[limits]
login_timeout_s = 30.0         # close a connection that has not logged in (GT06 login / Teltonika IMEI)
idle_timeout_s = 900.0         # close a connection silent for this long
max_frame = 32768              # largest frame accepted; a larger declared length closes at once
max_connections = 50000        # device connections in total
max_connections_per_ip = 200   # device connections per source IP (carrier NAT shares addresses)
udp_max_inflight = 1000        # UDP datagrams being committed at once; more are dropped unACKed

[codecs]
gt06_crc = "reject"       # "reject": a bad CRC closes the connection, nothing is ACKed; "count": accept and flag
teltonika_crc = "reject"
# gt06_device_time_offset_min = 480   # GT06 0x12/0x16 device time is UTC+8h (default: the login's time zone, else UTC)

[registry]
unknown_devices = "reject"   # "reject": Teltonika gets 00, GT06 no login reply, both closed; "register": auto-create
default_company = "default"  # company of auto-registered devices

[bus]
driver = "memory"                       # "memory" (one process) or "redis" (several gateways and relays)
redis_url = "redis://127.0.0.1:6379/0"  # use appendonly yes (+ appendfsync always for power-loss safety)
prefix = "fleetgate"
positions_maxlen = 1000000              # stream cap (XADD MAXLEN ~)
ingest_maxlen = 100000
dedup_window_s = 3600                   # a resent record within this window is dropped
memory_dedup_max = 1000000

[state]
driver = "sqlite"                       # "sqlite" (one process) or "redis"
sqlite_path = "fleetgate.sqlite"
redis_url = "redis://127.0.0.1:6379/0"
prefix = "fleetgate"

[commit]
max_batch = 2000          # records per bus write (group commit across connections)

[pipeline]
moving_start_kmh = 5.0    # stopped -> moving above this speed
moving_stop_kmh = 2.0     # moving -> stopped below this speed (hysteresis)
max_future_s = 90000.0    # fix times further ahead than this are flagged "future_time"
max_jump_kmh = 1000.0     # integrated odometer ignores jumps faster than this

[mqtt]
enabled = false
host = "127.0.0.1"
port = 1883
client_id = "fleetgate-gateway"
json_topic = "fleetgate/devices/{imei}/position"
teltonika_topic = "fleetgate/devices/{imei}/teltonika"
# shared_group = "gateways"   # MQTT 5 shared subscription: several gateways split the topics
session_expiry_s = 86400

[metrics]
host = "127.0.0.1"        # /metrics and /healthz of the device side (the relay's REST port serves them too)
port = 9102

[relay]
enabled = true                  # fleetgate run: start the relay in the same process
host = "0.0.0.0"
ws_port = 8080                  # WebSocket: native protocol at /ws
rest_port = 8000                # REST: /healthz, /metrics, admin API, OpenAPI at /schema
public_url = ""                 # how clients reach ws_port, e.g. "wss://fleet.example.com" (default ws://HOST:PORT)
instance_id = ""                # default hostname:pid
auth_timeout_s = 10.0           # no valid auth message by then: Unauthorized, close 4001
ping_interval_s = 20.0          # WebSocket ping frames to quiet sockets
ping_timeout_s = 20.0           # no answer to a ping by then: close
max_message = 16384             # larger client messages close with 1009
send_buffer_max = 1048576       # bytes queued toward one client; beyond it the client is closed (4008)
flush_interval_ms = 5.0         # fan-out frames for one socket within this window: one write (0: end of loop turn)
driver_min_interval_s = 1.0     # at most one accepted driver location per interval (RateLimited)
max_connections_per_company = 10000   # per relay instance; the admin API can override per company
max_connections = 100000        # WebSocket connections on this instance

[relay.company_limits]
# acme = 500                    # connection cap for one company

[auth]
secret = ""                     # HS256 secret; empty: secret_file (created with a random secret if missing)
secret_file = "fleetgate.secret"
algorithms = ["HS256"]          # or ["RS256"] / ["ES256"] with public_key_file or jwks_file
public_key_file = ""
jwks_file = ""
issuer = ""                     # checked when set
audience = ""                   # checked when set
leeway_s = 0.0

[pusher]
enabled = true                  # Pusher protocol at ws://HOST:ws_port/app/{key}, auth at POST /broadcasting/auth
activity_timeout_s = 30         # told to clients: they pusher:ping after this much silence
pong_timeout_s = 30.0           # the relay pings quiet sockets ([relay] ping_interval_s); no pong by then: 4201
max_message = 10240             # client messages and event data (bytes)
batch_window_ms = 100           # location records for one channel within this window: one array event

[[pusher.apps]]
id = "1"                        # numeric (the official Python server library requires it)
key = "fleetgate"               # clients connect to /app/fleetgate
secret = ""                     # empty: derived from the [auth] secret
name = "fleetgate"
max_connections = 100000
enable_client_messages = false  # client-* events on private/presence channels (10 per second)
max_client_events_per_s = 10

[links]
enabled = true                  # public tracking links (REST /api/tracking-links, /api/public/tracking-links)
smtp_host = ""                  # empty: verification codes are written to the log (local demo)
smtp_port = 587
smtp_username = ""
smtp_password = ""
smtp_tls = "starttls"           # "none", "starttls" or "tls"
mail_from = "fleetgate@localhost"
geocoder_url = ""               # Nominatim-compatible URL for street-level addresses; empty: offline town table
geocoder_user_agent = "fleetgate"
verify_per_minute_per_ip = 30   # beyond: HTTP 429 with Retry-After
poll_per_minute_per_session = 60
ws_connections_per_ip = 100     # Pusher-protocol sockets per address; beyond: pusher:error 4100
channel_messages_per_s = 10.0   # per link channel; faster positions are coalesced to the latest
speed_window_s = 600.0          # ETA: average moving speed over this recent window
"""
