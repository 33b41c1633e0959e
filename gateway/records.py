"""The records the gateway puts on the bus, and their deterministic ids.

A ``TrackedPosition`` is one position after the pipeline: decoded, checked
(plausibility ``flags``, never silently dropped), enriched with what the
registry knows about the device, and carrying the device's own events
(GT06 alarms, Teltonika event IO). ``IngestPosition`` is a position from
another source (a driver's phone, through the relay) on the ``ingest``
stream, before the pipeline.

Records are frozen msgspec Structs: msgpack on Redis, JSON toward clients.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

Kind = str
"""Record kind, part of the dedup key: ``position`` (a fix) or ``alarm`` (a GT06 alarm packet)."""

IoValue = int | str


class DeviceEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True):
    """Something the device itself reported with the fix: a GT06 alarm, a Teltonika event IO."""

    kind: str  # "alarm" (GT06 alarm code) or "io" (Teltonika event IO id)
    name: str  # e.g. "sos", "overspeed", "io_247"
    code: int
    value: IoValue | None = None


class Device(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True, forbid_unknown_fields=True):
    """A registered tracker: what the registry knows about an IMEI."""

    imei: str
    asset_id: str
    company_id: str
    display_name: str = ""
    speed_limit_kmh: float | None = None
    protocol: str | None = None  # "gt06" | "teltonika" | "mqtt" | None (any)


class TrackedPosition(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One enriched position as committed to the bus (see module docstring).

    Not ``kw_only``: the pipeline builds one per record with positional arguments, several times
    faster than 26 keywords in msgspec. Add fields only at the end.
    """

    id: str
    kind: Kind
    imei: str
    asset_id: str
    company_id: str
    display_name: str
    source: str  # "gt06" | "teltonika" | "teltonika-udp" | "mqtt" | "driver"
    fix_time: datetime
    received_at: datetime
    lat: float
    lng: float
    speed_kmh: float
    course: int
    satellites: int
    valid: bool
    moving: bool
    altitude: int | None = None
    ignition: bool | None = None
    odometer_m: int | None = None
    external_voltage: float | None = None
    battery_voltage: float | None = None
    gsm_signal: int | None = None
    address: str | None = None
    flags: tuple[str, ...] = ()
    events: tuple[DeviceEvent, ...] = ()
    io: dict[int, IoValue] = {}

    @property
    def dedup_key(self) -> str:
        return self.id


class IngestPosition(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True):
    """A position from outside the device listeners (drivers' phones), before the pipeline."""

    source: str  # "driver"
    asset_id: str  # for drivers: the user id
    company_id: str
    fix_time: datetime
    received_at: datetime
    lat: float
    lng: float
    speed_kmh: float = 0.0
    course: int = 0
    display_name: str = ""
    accuracy_m: float | None = None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def fix_time_ms(fix_time: datetime) -> int:
    """Milliseconds since the epoch, exact (integer arithmetic, no float rounding); naive times count as UTC."""
    if fix_time.tzinfo is None:
        fix_time = fix_time.replace(tzinfo=UTC)
    if fix_time.microsecond % 1000 == 0:  # whole milliseconds (every codec's): the float is exact after rounding
        return round(fix_time.timestamp() * 1000)
    return (fix_time - _EPOCH) // _MS


def record_id(imei: str, fix_time: datetime, kind: Kind) -> str:
    """Deterministic id from IMEI + fix time (ms) + kind: equal for a resent record, so consumers can be idempotent."""
    return f"{imei}:{fix_time_ms(fix_time)}:{kind}"


encode_msgpack = msgspec.msgpack.Encoder().encode
decode_position = msgspec.msgpack.Decoder(TrackedPosition).decode
decode_ingest = msgspec.msgpack.Decoder(IngestPosition).decode
