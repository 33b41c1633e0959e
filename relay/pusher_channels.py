"""Pusher channels: names and authorisation, wire messages, ``location.updated`` data (all pure), and the
fan-out of events to this instance's channel members (:class:`Fanout`).

References are to ``/work/shared/pusher.md`` (the protocol as real clients speak it). Double
encoding (§2, §9.1): ``connection_established``, ``subscription_succeeded``, ``member_added`` and
``member_removed`` carry ``data`` as a JSON *string*; ``pusher:error`` and
``pusher:subscription_error`` carry an object; channel events carry the publisher's data as is
(normally a string).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import msgspec

from gateway.records import DeviceEvent, TrackedPosition
from relay import metrics
from relay.frames import text_frame
from relay.hub import Hub
from relay.pusher_auth import verify_channel_auth
from relay.wsserver import WsConnection

MAX_CHANNEL_NAME = 164  # pusher.md §3
MAX_EVENT_NAME = 200  # §5 (library check)
MAX_USER_ID = 128  # §5, presence
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-=@,.;]+")

PUBLIC, PRIVATE, ENCRYPTED, PRESENCE = "public", "private", "private-encrypted", "presence"

LOCATION_EVENT = "location.updated"
ALERT_EVENT = "alert.triggered"

# A public tracking link's viewers (relay.links.channel): authorised by a link session, not an access token.
TRACKING_LINK_PREFIX = "private-tracking-link."

_encode = msgspec.json.Encoder().encode


def channel_kind(channel: str) -> str:
    """``public``, ``private``, ``private-encrypted`` or ``presence`` (pusher.md §3)."""
    if channel.startswith("private-encrypted-"):
        return ENCRYPTED
    if channel.startswith("private-"):
        return PRIVATE
    if channel.startswith("presence-"):
        return PRESENCE
    return PUBLIC


def channel_name_problem(channel: str) -> str | None:
    """Why ``channel`` is not a valid name (at most 164 of ``A-Za-z0-9_-=@,.;``), or None when it is."""
    if not channel:
        return "channel name is empty"
    if len(channel) > MAX_CHANNEL_NAME:
        return f"channel name is longer than {MAX_CHANNEL_NAME} characters"
    if CHANNEL_NAME.fullmatch(channel) is None:
        return "channel name may only contain A-Z, a-z, 0-9 and _ - = @ , . ;"
    return None


def is_tracking_link(channel: str) -> bool:
    """A ``private-tracking-link.{uuid}`` channel: admitted by :class:`relay.links.channel.LinkChannels`."""
    return channel.startswith(TRACKING_LINK_PREFIX)


def hub_key(app_id: str, channel: str) -> str:
    """The hub channel of a Pusher channel: apps never share one."""
    return f"p:{app_id}:{channel}"


def account_channel(company_id: str) -> str:
    """Every asset of one account (company)."""
    return f"private-account.{company_id}"


def asset_channel(asset_id: str) -> str:
    """One asset; asset ids are unique within a deployment (``/broadcasting/auth`` checks the company)."""
    return f"private-asset.{asset_id}"


# --- client messages -------------------------------------------------------------------------------------

NULL = msgspec.Raw(b"null")


class ClientMessage(msgspec.Struct, frozen=True):
    """Any client message; ``data`` is kept as raw JSON (client events relay it untouched)."""

    event: str
    channel: str | None = None
    data: msgspec.Raw = NULL


class SubscribeData(msgspec.Struct, frozen=True):
    channel: str
    auth: str | None = None
    channel_data: str | None = None  # presence: the exact JSON string the auth endpoint signed


class ChannelData(msgspec.Struct, frozen=True):
    """Presence ``channel_data``: ``user_id`` may be a JSON number (Laravel sends model keys)."""

    user_id: str | int
    user_info: msgspec.Raw = msgspec.Raw(b"")  # empty: absent


decode_message = msgspec.json.Decoder(ClientMessage).decode
_decode_subscribe = msgspec.json.Decoder(SubscribeData).decode
_decode_str = msgspec.json.Decoder(str).decode
decode_channel_data = msgspec.json.Decoder(ChannelData).decode


def decode_subscribe(data: msgspec.Raw) -> SubscribeData:
    """``pusher:subscribe`` / ``unsubscribe`` data: an object, or (older docs) that object as a string (§2)."""
    raw = bytes(data)
    if raw[:1] == b'"':
        raw = _decode_str(raw).encode()
    return _decode_subscribe(raw)


class Membership(msgspec.Struct, frozen=True, gc=False):
    """A socket's membership of one presence channel, from the signed ``channel_data``."""

    user_key: str  # the user id's string form: users compare by it (§2.2)
    user_id_json: bytes  # as given: echoed as client events' user_id
    member: str  # {"user_id", "user_info"} JSON: member_added data


class SubscriptionRefused(Exception):
    """Answered with a channel-scoped ``pusher:subscription_error`` (§2.1); the socket stays open."""

    def __init__(self, kind: str, message: str, status: int) -> None:
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status


def authorise(request: SubscribeData, key: str, secret: str, socket_id: str) -> Membership | None:
    """Check the channel name and, but for public channels, the signature (§3, §4; presence: over the
    exact ``channel_data`` string); the presence membership it grants, None for other channels.

    Raises :class:`SubscriptionRefused`: ``InvalidChannel`` 400 for a bad name, ``AuthError`` 403 for
    ``#server-to-user-`` channels (no ``pusher:signin`` here), ``AuthError`` 401 for a missing or wrong
    signature, ``InvalidChannelData`` 400 for signed presence data without a usable ``user_id``."""
    channel = request.channel
    if channel.startswith("#"):
        raise SubscriptionRefused("AuthError", "#server-to-user- channels need pusher:signin, not supported here", 403)
    problem = channel_name_problem(channel)
    if problem is not None:
        raise SubscriptionRefused("InvalidChannel", problem, 400)
    kind = channel_kind(channel)
    if kind == PUBLIC:
        return None
    channel_data = request.channel_data if kind == PRESENCE else None
    if kind == PRESENCE and channel_data is None:
        raise SubscriptionRefused("AuthError", "presence channels need channel_data", 401)
    if request.auth is None or not verify_channel_auth(key, secret, request.auth, socket_id, channel, channel_data):
        signed = f"{socket_id}:{channel}" + (":<channel_data>" if channel_data is not None else "")
        raise SubscriptionRefused("AuthError", f"Invalid signature: expected HMAC SHA256 hex digest of {signed}", 401)
    if channel_data is None:
        return None
    try:
        data = decode_channel_data(channel_data.encode())
    except msgspec.DecodeError:
        raise SubscriptionRefused(
            "InvalidChannelData", "channel_data needs a user_id (string or integer)", 400
        ) from None
    user_key = str(data.user_id)
    if not user_key or len(user_key) > MAX_USER_ID:
        raise SubscriptionRefused("InvalidChannelData", f"user_id must have 1 to {MAX_USER_ID} characters", 400)
    return Membership(user_key, _encode(data.user_id), member_json(data))


# --- server messages -------------------------------------------------------------------------------------

PONG = b'{"event":"pusher:pong","data":{}}'


class _Internal(msgspec.Struct, frozen=True, omit_defaults=True):
    event: str
    channel: str | None = None
    data: Any = None


class ChannelEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """A channel event; ``data`` and ``user_id`` are JSON already (the publisher's, or the member's as given)."""

    event: str
    channel: str
    data: msgspec.Raw
    user_id: msgspec.Raw | None = None


def connection_established(socket_id: str, activity_timeout: int) -> bytes:
    data = _encode({"socket_id": socket_id, "activity_timeout": activity_timeout}).decode()
    return _encode(_Internal("pusher:connection_established", data=data))


def error(code: int | None, message: str) -> bytes:
    """``pusher:error``: ``data`` is an object ``{"code", "message"}`` (§1.5); pysher reads ``data['code']``."""
    return _encode(_Internal("pusher:error", data={"code": code, "message": message}))


def subscription_succeeded(channel: str, data: str = "{}") -> bytes:
    """Always with ``data``, ``"{}"`` for non-presence channels (§2.1, §9.10)."""
    return _encode(_Internal("pusher_internal:subscription_succeeded", channel, data))


def subscription_error(channel: str, kind: str, message: str, status: int) -> bytes:
    """Channel-scoped, the shape pusher-js builds for HTTP auth failures, so Echo's ``.error()`` fires (§2.1)."""
    return _encode(_Internal("pusher:subscription_error", channel, {"type": kind, "error": message, "status": status}))


def channel_event(event: str, channel: str, data_json: bytes, user_id_json: bytes | None = None) -> bytes:
    user_id = msgspec.Raw(user_id_json) if user_id_json is not None else None
    return _encode(ChannelEvent(event, channel, msgspec.Raw(data_json), user_id))


def internal_event(event: str, channel: str, data: str) -> bytes:
    """``pusher_internal:member_added`` / ``member_removed``: data double-encoded."""
    return _encode(_Internal(event, channel, data))


class Member(msgspec.Struct, frozen=True, omit_defaults=True):
    """A presence member as ``member_added`` sends it: the user id as given, its info untouched."""

    user_id: msgspec.Raw
    user_info: msgspec.Raw | None = None


def member_json(channel_data: ChannelData) -> str:
    info = channel_data.user_info
    return _encode(Member(msgspec.Raw(_encode(channel_data.user_id)), info if bytes(info) else None)).decode()


class _StoredMember(msgspec.Struct, frozen=True):
    user_id: msgspec.Raw
    user_info: msgspec.Raw = NULL


_decode_member = msgspec.json.Decoder(_StoredMember).decode


def member_removed_data(member: str) -> str:
    return _encode({"user_id": _decode_member(member).user_id}).decode()


def presence_data(members: dict[str, str]) -> str:
    """``subscription_succeeded`` data of a presence channel: ``{"presence":{"ids","hash","count"}}`` (§2.1)."""
    ids: list[msgspec.Raw] = []
    info: dict[str, msgspec.Raw] = {}
    for user_key in sorted(members):
        member = _decode_member(members[user_key])
        ids.append(member.user_id)
        info[user_key] = member.user_info
    return _encode({"presence": {"ids": ids, "hash": info, "count": len(ids)}}).decode()


# --- location.updated --------------------------------------------------------------------------------------


class LocationUpdate(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True, gc=False):
    """``location.updated`` data: one enriched record, camelCase, None fields left out."""

    id: str
    asset_id: str
    company_id: str
    imei: str
    display_name: str
    source: str
    lat: float
    lng: float
    speed: float  # km/h
    heading: int  # course, degrees
    altitude: int | None = None
    satellites: int
    valid: bool
    moving: bool
    ignition: bool | None = None
    timestamp: datetime  # fix time, ISO 8601 UTC
    received_at: datetime
    odometer_m: int | None = None
    external_voltage: float | None = None
    battery_voltage: float | None = None
    gsm_signal: int | None = None
    address: str | None = None
    flags: tuple[str, ...] = ()
    events: tuple[DeviceEvent, ...] = ()


def location_update(r: TrackedPosition) -> bytes:
    """The record as ``location.updated`` JSON (encoded once, shared by every channel and app)."""
    return _encode(
        LocationUpdate(
            id=r.id, asset_id=r.asset_id, company_id=r.company_id, imei=r.imei, display_name=r.display_name,
            source=r.source, lat=r.lat, lng=r.lng, speed=r.speed_kmh, heading=r.course, altitude=r.altitude,
            satellites=r.satellites, valid=r.valid, moving=r.moving, ignition=r.ignition, timestamp=r.fix_time,
            received_at=r.received_at, odometer_m=r.odometer_m, external_voltage=r.external_voltage,
            battery_voltage=r.battery_voltage, gsm_signal=r.gsm_signal, address=r.address, flags=r.flags,
            events=r.events,
        )
    )  # fmt: skip


def batch_payloads(items: list[bytes], limit: int) -> Iterator[bytes]:
    """Event data for one channel's window: one item as the object, several as JSON arrays of at most
    ``limit`` bytes each (an item larger than the limit alone goes out as a one-item array)."""
    if len(items) == 1:
        yield items[0]
        return
    chunk: list[bytes] = []
    size = 2  # "[" and "]"
    for item in items:
        grown = size + len(item) + (1 if chunk else 0)
        if chunk and grown > limit:
            yield b"[" + b",".join(chunk) + b"]"
            chunk, grown = [], 2 + len(item)
        chunk.append(item)
        size = grown
    yield b"[" + b",".join(chunk) + b"]"


def as_json_string(text: bytes) -> bytes:
    """``text`` (UTF-8 JSON) as a JSON string literal: channel event data is the publisher's *string*."""
    return _encode(text.decode())


# --- fan-out ---------------------------------------------------------------------------------------------


class Fanout:
    """Events to this instance's members of a channel: each encoded once per channel, its frame pushed to
    every member; records batched per channel for ``batch_window_ms`` (one timer per channel and window,
    started by the window's first record), each record encoded once for all its channels and apps."""

    def __init__(self, hub: Hub, app_ids: Sequence[str], batch_window_ms: int, max_message: int) -> None:
        self.hub = hub
        self.app_ids = tuple(app_ids)
        self.window_s = batch_window_ms / 1000
        self.max_message = max_message
        self._batches: dict[str, list[bytes]] = {}  # hub key -> location.updated items of the open window
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._batches.clear()

    def deliver(
        self,
        app_id: str,
        channel: str,
        event: str,
        data_json: bytes,
        *,
        skip: WsConnection | None = None,
        user_id_json: bytes | None = None,
        type_: str = "event",
    ) -> None:
        """One event (``data_json``: the data as JSON) to the channel's members but ``skip``; the caller flushes."""
        members = self.hub.channels.get(hub_key(app_id, channel))
        if not members:
            return
        frame = text_frame(channel_event(event, channel, data_json, user_id_json))
        delivered = 0
        for conn in members:
            if conn is not skip:
                conn.push(frame)
                delivered += 1
        metrics.MESSAGES_OUT.labels(protocol="pusher", type=type_).inc(delivered)

    def alert(self, company_id: str, asset_id: str, alert_json: bytes) -> None:
        """``alert.triggered`` on the account and asset channels of every app (data: the JSON as a string)."""
        data = as_json_string(alert_json)
        for app_id in self.app_ids:
            for channel in (account_channel(company_id), asset_channel(asset_id)):
                self.deliver(app_id, channel, ALERT_EVENT, data, type_="alert")
        self.hub.server.schedule_flush()

    def on_record(self, record: TrackedPosition) -> None:
        """Add the record to the open window of each of its channels that has members (a hub handler)."""
        channels = self.hub.channels
        item: bytes | None = None
        for app_id in self.app_ids:
            for channel in (account_channel(record.company_id), asset_channel(record.asset_id)):
                key = hub_key(app_id, channel)
                if key not in channels:
                    continue
                if item is None:
                    item = location_update(record)
                batch = self._batches.get(key)
                if batch is None:
                    self._batches[key] = [item]
                    self._timers[key] = self._loop.call_later(self.window_s, self._flush, key)
                else:
                    batch.append(item)

    def _flush(self, key: str) -> None:
        self._timers.pop(key, None)
        items = self._batches.pop(key, None)
        members = self.hub.channels.get(key)
        if not items or not members:
            return
        channel = key.split(":", 2)[2]
        frames = [
            text_frame(channel_event(LOCATION_EVENT, channel, as_json_string(data)))
            for data in batch_payloads(items, self.max_message)
        ]
        for conn in members:
            for frame in frames:
                conn.push(frame)
        metrics.MESSAGES_OUT.labels(protocol="pusher", type="location").inc(len(members) * len(frames))
        self.hub.server.schedule_flush()
