"""The native JSON protocol at ``/ws``: drivers send positions, offices watch their company's assets.

Documented for client authors in ``docs/protocol.md``. Every client message
has an ``action``, every server message a ``type``. A session is a small
state machine: ``auth`` must come first (within the auth timeout); then a
driver may send ``location`` (at most one accepted per
``driver_min_interval_s``) and an office may ``subscribe`` / ``unsubscribe``;
both may ``ping``.

Channel keys (see :mod:`relay.hub`): ``c:{company}`` holds offices watching
all of a company's assets, ``a:{company}:{asset}`` offices watching one.
Both are built from the verified token's company, so a record only ever
reaches sockets of its own company. A token listing ``assets`` is restricted
to those: "all" then means each listed asset.

Client messages are handled in order, one at a time, by a task that exists
only while messages are waiting; reading pauses when too many wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from websockets.http11 import Request, Response

from gateway.bus.base import Bus, BusError
from gateway.records import DeviceEvent, IngestPosition, TrackedPosition
from gateway.state.base import StateStore
from relay import metrics
from relay.control import Control, ControlMessage
from relay.frames import text_frame
from relay.hub import Hub
from relay.settings import RelaySettings
from relay.tokens import Claims, TokenError, TokenVerifier
from relay.wsserver import CODE_PING_TIMEOUT, Inbox, WsConnection

log = logging.getLogger(__name__)

CODE_UNAUTHORIZED = 4001
CODE_TOKEN_EXPIRED = 4002
CODE_LIMIT_REACHED = 4004

# --- client messages --------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    action: str


class AuthMessage(msgspec.Struct, forbid_unknown_fields=True):
    action: str
    user_id: str
    role: str
    token: str


class LocationMessage(msgspec.Struct, forbid_unknown_fields=True):
    action: str
    lat: float
    lng: float
    speed: float = 0.0
    bearing: float = 0.0
    timestamp: str | None = None
    accuracy: float | None = None


class SubscribeMessage(msgspec.Struct, forbid_unknown_fields=True):
    action: str
    driver_id: str | None = None
    all: bool = False


class PingMessage(msgspec.Struct, forbid_unknown_fields=True):
    action: str


# --- server messages --------------------------------------------------------------------------


class NativeLocation(msgspec.Struct, tag_field="type", tag="location", omit_defaults=True, gc=False):
    """A record as the native protocol shows it: the position, then what enrichment added."""

    driver_id: str
    lat: float
    lng: float
    speed: float
    bearing: int
    timestamp: datetime
    received_at: datetime
    display_name: str
    moving: bool
    valid: bool
    source: str
    satellites: int = 0
    imei: str = ""
    altitude: int | None = None
    ignition: bool | None = None
    odometer_m: int | None = None
    external_voltage: float | None = None
    battery_voltage: float | None = None
    gsm_signal: int | None = None
    address: str | None = None
    flags: tuple[str, ...] = ()
    events: tuple[DeviceEvent, ...] = ()


def native_location(r: TrackedPosition) -> NativeLocation:
    return NativeLocation(
        r.asset_id, r.lat, r.lng, r.speed_kmh, r.course, r.fix_time, r.received_at, r.display_name, r.moving,
        r.valid, r.source, r.satellites, r.imei, r.altitude, r.ignition, r.odometer_m, r.external_voltage,
        r.battery_voltage, r.gsm_signal, r.address, r.flags, r.events,
    )  # fmt: skip


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "auth": msgspec.json.Decoder(AuthMessage).decode,
    "location": msgspec.json.Decoder(LocationMessage).decode,
    "subscribe": msgspec.json.Decoder(SubscribeMessage).decode,
    "unsubscribe": msgspec.json.Decoder(SubscribeMessage).decode,
    "ping": msgspec.json.Decoder(PingMessage).decode,
}
_encode = msgspec.json.Encoder().encode

ROLES = ("driver", "office")


class ClientError(Exception):
    """A request the protocol refuses: sent to the client as ``{"type":"error"}``; the socket stays open."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class NativeApp:
    """The ``/ws`` application: sessions, per-company connection counts, revocation and record fan-out."""

    name = "native"
    ping_timeout_code = CODE_PING_TIMEOUT

    def __init__(
        self,
        settings: RelaySettings,
        hub: Hub,
        bus: Bus,
        store: StateStore,
        control: Control,
        verifier: TokenVerifier,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.bus = bus
        self.store = store
        self.control = control
        self.verifier = verifier
        self.max_message = settings.max_message
        self.ping_interval_s, self.ping_timeout_s = settings.ping_interval_s, settings.ping_timeout_s
        self.company_connections: collections.Counter[str] = collections.Counter()
        self.last_location: dict[str, float] = {}  # "company/driver" -> loop time of the last accepted location
        self.by_jti: dict[str, set[NativeSession]] = {}
        self._locations_out = metrics.MESSAGES_OUT.labels(protocol="native", type="location")  # once, not per record
        hub.handlers.append(self.on_record)
        control.add_listener(self.on_control)

    def match(self, path: str) -> bool:
        return path == "/ws" or path.startswith(("/ws?", "/ws/"))

    def open(self, conn: WsConnection, request: Request) -> NativeSession | Response:
        return NativeSession(self, conn)

    def company_limit(self, company: str) -> int:
        override = self.control.company_limit(company)
        if override is not None:
            return override
        return self.settings.company_limits.get(company, self.settings.max_connections_per_company)

    def on_record(self, record: TrackedPosition) -> None:
        channels = self.hub.channels
        company_members = channels.get("c:" + record.company_id)
        asset_members = channels.get(f"a:{record.company_id}:{record.asset_id}")
        if not company_members and not asset_members:
            return
        frame = text_frame(_encode(native_location(record)))
        delivered = 0
        if company_members:
            for conn in company_members:
                conn.push(frame)
            delivered = len(company_members)
        if asset_members:
            for conn in asset_members:
                if company_members is None or conn not in company_members:
                    conn.push(frame)
                    delivered += 1
        self._locations_out.inc(delivered)

    def on_control(self, message: ControlMessage) -> None:
        if message.kind == "revoke":
            for session in list(self.by_jti.get(str(message.data.get("jti")), ())):
                session.unauthorized("token revoked", CODE_UNAUTHORIZED, "revoked", close_reason="revoked")


class NativeSession:
    """One native-protocol socket; see the module docstring for the state machine."""

    def __init__(self, app: NativeApp, conn: WsConnection) -> None:
        self.app = app
        self.conn = conn
        self.claims: Claims | None = None
        self.channels: set[str] = set()
        self.inbox = Inbox(conn, self._handle)
        conn.call_later(app.settings.auth_timeout_s, self._auth_timeout)

    # --- wsserver.Session ----------------------------------------------------------------------

    def on_text(self, data: bytes) -> None:
        self.inbox.put(data)

    def on_binary(self, data: bytes) -> None:
        self.error("BadPayload", "messages are JSON text frames")

    def on_close(self) -> None:
        for channel in self.channels:
            self.app.hub.leave(channel, self.conn)
        self.channels.clear()
        self.inbox.clear()
        claims, self.claims = self.claims, None
        if claims is not None and claims.role == "driver":
            key = f"{claims.company}/{claims.sub}"
            last = self.app.last_location.get(key)
            if last is not None and asyncio.get_running_loop().time() - last >= self.app.settings.driver_min_interval_s:
                del self.app.last_location[key]
        if claims is not None:
            self.app.company_connections[claims.company] -= 1
            if self.app.company_connections[claims.company] <= 0:
                del self.app.company_connections[claims.company]
            sessions = self.app.by_jti.get(claims.jti)
            if sessions is not None:
                sessions.discard(self)
                if not sessions:
                    del self.app.by_jti[claims.jti]

    # --- message handling ----------------------------------------------------------------------

    async def _handle(self, data: bytes) -> None:
        try:
            action = _decode_envelope(data).action
        except msgspec.DecodeError:
            self.error("BadPayload", "expected a JSON object with an 'action' string")
            return
        decode = _DECODERS.get(action)
        metrics.MESSAGES_IN.labels(protocol="native", type=action if decode else "unknown").inc()
        if decode is None:
            self.error("InvalidAction", f"unknown action {action[:40]!r}")
            return
        try:
            message = decode(data)
        except msgspec.DecodeError as exc:
            self.error("BadPayload", f"{action}: {exc}")
            return
        if action == "ping":
            self.conn.send_text(b'{"type":"pong"}')
            return
        if action == "auth":
            self._auth(message)
            return
        if self.claims is None:
            self.unauthorized("authenticate first: send an auth message", CODE_UNAUTHORIZED, "not_authenticated")
            return
        try:
            if action == "location":
                await self._location(message)
            elif action == "subscribe":
                await self._subscribe(message)
            else:
                self._unsubscribe(message)
        except ClientError as exc:
            self.error(exc.error, exc.message)

    def _auth(self, message: AuthMessage) -> None:
        if self.claims is not None:
            self.error("InvalidAction", "already authenticated")
            return
        if message.role not in ROLES:
            self.unauthorized("role must be 'driver' or 'office'", CODE_UNAUTHORIZED, "role_mismatch")
            return
        try:
            claims = self.app.verifier.verify(message.token)
        except TokenError as exc:
            code = CODE_TOKEN_EXPIRED if exc.reason == "expired" else CODE_UNAUTHORIZED
            self.unauthorized(f"invalid token ({exc.reason})", code, exc.reason)
            return
        if self.app.control.is_revoked(claims.jti):
            self.unauthorized("token revoked", CODE_UNAUTHORIZED, "revoked")
            return
        if claims.sub != message.user_id:
            self.unauthorized("user_id does not match the token", CODE_UNAUTHORIZED, "user_mismatch")
            return
        if claims.role != message.role:
            self.unauthorized("role does not match the token", CODE_UNAUTHORIZED, "role_mismatch")
            return
        app = self.app
        if app.company_connections[claims.company] >= app.company_limit(claims.company):
            metrics.CLIENT_ERRORS.labels(protocol="native", type="LimitReached").inc()
            self._send({"type": "error", "error": "LimitReached", "message": "connection limit of the company reached"})
            self.conn.close(CODE_LIMIT_REACHED, "LimitReached", reason="limit_reached")
            return
        self.claims = claims
        app.company_connections[claims.company] += 1
        app.by_jti.setdefault(claims.jti, set()).add(self)
        self.conn.set_role(claims.role)
        # Close within 1 s of exp: a timer on the loop clock at the token's expiry.
        delay = max(0.0, claims.exp - time.time())
        self.conn.call_later(delay, lambda: self.unauthorized("token expired", CODE_TOKEN_EXPIRED, "token_expired"))
        expires = datetime.fromtimestamp(claims.exp, UTC)
        self._send({
            "type": "authenticated", "user_id": claims.sub, "role": claims.role,
            "company_id": claims.company, "expires_at": expires,
        })  # fmt: skip

    async def _location(self, message: LocationMessage) -> None:
        claims = self.claims
        assert claims is not None
        if claims.role != "driver":
            raise ClientError("Forbidden", "only drivers send locations")
        if not (-90.0 <= message.lat <= 90.0 and -180.0 <= message.lng <= 180.0):
            raise ClientError("BadPayload", "lat must be within [-90, 90] and lng within [-180, 180]")
        if not (0.0 <= message.speed <= 1500.0) or not (0.0 <= message.bearing <= 360.0):
            raise ClientError("BadPayload", "speed must be within [0, 1500] km/h and bearing within [0, 360]")
        now = datetime.now(UTC)
        fix_time = _parse_time(message.timestamp) if message.timestamp is not None else now
        # Per driver, not per socket: a second connection of the same driver shares the budget.
        driver_key = f"{claims.company}/{claims.sub}"
        last_accepted = self.app.last_location
        loop_now = asyncio.get_running_loop().time()
        if loop_now - last_accepted.get(driver_key, float("-inf")) < self.app.settings.driver_min_interval_s:
            raise ClientError("RateLimited", "at most one location per second")
        last_accepted[driver_key] = loop_now
        item = IngestPosition(
            source="driver", asset_id=claims.sub, company_id=claims.company, fix_time=fix_time, received_at=now,
            lat=message.lat, lng=message.lng, speed_kmh=message.speed, course=round(message.bearing) % 361,
            display_name=claims.name or claims.sub, accuracy_m=message.accuracy,
        )  # fmt: skip
        try:
            await self.app.bus.publish_ingest([item])
        except BusError:
            last_accepted.pop(driver_key, None)  # not stored: the driver may resend at once
            raise ClientError("Unavailable", "location not stored, send it again") from None
        self._send({"type": "accepted", "timestamp": fix_time})

    async def _subscribe(self, message: SubscribeMessage) -> None:
        claims = self.claims
        assert claims is not None
        if claims.role != "office":
            raise ClientError("Forbidden", "only offices subscribe")
        if message.all == (message.driver_id is not None):
            raise ClientError("BadPayload", "give either driver_id or all: true")
        if message.driver_id is not None:
            await self._check_asset(claims, message.driver_id)
            channels = [f"a:{claims.company}:{message.driver_id}"]
        elif claims.assets is not None:
            channels = [f"a:{claims.company}:{asset}" for asset in claims.assets]
        else:
            channels = ["c:" + claims.company]
        new = [c for c in channels if c not in self.channels]
        conn, hub = self.conn, self.app.hub
        conn.hold = []  # live frames wait until the snapshot is sent, so no older position follows a newer one
        for channel in new:
            hub.join(channel, conn)
            self.channels.add(channel)
        try:
            snapshot = await self._snapshot(claims, message.driver_id)
        finally:
            held, conn.hold = conn.hold, None
        reply: dict[str, Any] = {"type": "subscribed"}
        reply.update({"driver_id": message.driver_id} if message.driver_id is not None else {"all": True})
        self._send(reply)
        for record in snapshot:
            conn.send_text(_encode(native_location(record)))
        for frame in held or ():
            conn.push(frame)
        self.app.hub.server.schedule_flush()

    async def _check_asset(self, claims: Claims, asset_id: str) -> None:
        """Refuse an asset of another company, or one the token does not list."""
        if claims.assets is not None and asset_id not in claims.assets:
            raise ClientError("Forbidden", "this token may not see that driver")
        company = self.app.hub.asset_company.get(asset_id)
        if company is None:
            last = await self.app.store.last_position(asset_id)
            company = last.company_id if last is not None else None
        if company is not None and company != claims.company:
            raise ClientError("Forbidden", "that driver belongs to another company")

    async def _snapshot(self, claims: Claims, asset_id: str | None) -> list[TrackedPosition]:
        store = self.app.store
        if asset_id is not None:
            last = await store.last_position(asset_id)
            return [last] if last is not None and last.company_id == claims.company else []
        records = await store.last_positions(claims.company)
        if claims.assets is not None:
            allowed = set(claims.assets)
            records = [r for r in records if r.asset_id in allowed]
        return records

    def _unsubscribe(self, message: SubscribeMessage) -> None:
        claims = self.claims
        assert claims is not None
        if claims.role != "office":
            raise ClientError("Forbidden", "only offices subscribe")
        if message.all == (message.driver_id is not None):
            raise ClientError("BadPayload", "give either driver_id or all: true")
        if message.driver_id is not None:
            channels = [f"a:{claims.company}:{message.driver_id}"]
        else:
            channels = [c for c in self.channels if c.startswith(("c:", "a:"))]
            if claims.assets is None:
                channels = [c for c in channels if c.startswith("c:")]
        for channel in channels:
            if channel in self.channels:
                self.channels.discard(channel)
                self.app.hub.leave(channel, self.conn)
        reply: dict[str, Any] = {"type": "unsubscribed"}
        reply.update({"driver_id": message.driver_id} if message.driver_id is not None else {"all": True})
        self._send(reply)

    # --- replies -------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        self.conn.send_text(_encode(message))

    def error(self, error: str, message: str) -> None:
        metrics.CLIENT_ERRORS.labels(protocol="native", type=error).inc()
        self._send({"type": "error", "error": error, "message": message})

    def unauthorized(self, message: str, code: int, reason: str, *, close_reason: str = "") -> None:
        """Send ``Unauthorized`` and close (4001, or 4002 for an expired token)."""
        if not self.conn.open:
            return
        metrics.AUTH_FAILURES.labels(reason=reason).inc()
        metrics.CLIENT_ERRORS.labels(protocol="native", type="Unauthorized").inc()
        self._send({"type": "error", "error": "Unauthorized", "message": message})
        close_reason = close_reason or ("token_expired" if code == CODE_TOKEN_EXPIRED else "unauthorized")
        self.conn.close(code, "Unauthorized", reason=close_reason)

    def _auth_timeout(self) -> None:
        if self.claims is None:
            self.unauthorized("no authentication within the auth timeout", CODE_UNAUTHORIZED, "timeout")


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ClientError("BadPayload", "timestamp must be ISO 8601") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
