"""From decoded device events to enriched ``TrackedPosition`` records.

Steps, in order, for every position (device or driver): plausibility flags
(never a silent drop), the record id (IMEI + fix time + kind, the dedup
key), registry data (asset, company, display name), and enrichment:
moving/stopped with hysteresis (ignition off forces stopped), ignition,
odometer (the device's own, else distance integrated per asset), voltages,
GSM signal, and the device's own events (GT06 alarms, Teltonika event IO).

The pipeline is synchronous and keeps a little state per asset (moving
flag, last fix, integrated odometer); :class:`gateway.ingest.Ingest` primes
that state from the store the first time it sees an asset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from gateway.records import Device, DeviceEvent, IngestPosition, TrackedPosition, record_id
from gateway.settings import PipelineSettings
from trackcodecs import Alarm, AvlPacket, Event, Location, Position

_Y2K = datetime(2000, 1, 1, tzinfo=UTC)
_EARTH_RADIUS_M = 6_371_008.8


@dataclass
class AssetState:
    """What the pipeline remembers of one asset between records."""

    moving: bool = False
    last_fix: datetime | None = None
    last_lat: float | None = None
    last_lng: float | None = None
    odometer_m: float = 0.0


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance (haversine), metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


class Pipeline:
    def __init__(self, settings: PipelineSettings) -> None:
        self.settings = settings
        self.assets: dict[str, AssetState] = {}
        self._max_future = timedelta(seconds=settings.max_future_s)

    def records_for(self, device: Device, source: str, event: Event, received_at: datetime) -> list[TrackedPosition]:
        """The records a decoded device event yields (none for heartbeats, handshakes, replies)."""
        if isinstance(event, AvlPacket):
            return [
                self.enrich(device, source, p, received_at, events=_io_events(p), crc_ok=event.crc_ok)
                for p in event.positions
            ]
        if isinstance(event, Location):
            return [self.enrich(device, source, event.position, received_at, crc_ok=event.crc_ok)]
        if isinstance(event, Alarm) and event.position is not None:
            alarm = DeviceEvent(kind="alarm", name=event.alarm, code=event.alarm_code)
            position = event.position
            return [
                self.enrich(device, source, position, received_at, kind="alarm", events=(alarm,), crc_ok=event.crc_ok)
            ]
        return []

    def enrich(
        self,
        device: Device,
        source: str,
        p: Position,
        received_at: datetime,
        *,
        kind: str = "position",
        events: tuple[DeviceEvent, ...] = (),
        crc_ok: bool = True,
    ) -> TrackedPosition:
        """One device position through plausibility, registry and enrichment."""
        flags = self._flags(p.fix_time, p.lat, p.lng, p.course, p.valid, received_at)
        if not crc_ok:
            flags.append("crc_mismatch")
        if p.historical:
            flags.append("historical")
        fix_time = p.fix_time if p.fix_time is not None else received_at
        state = self._state(device.asset_id)
        moving = self._moving(state, p.speed_kmh, p.ignition, fix_time)
        odometer = p.odometer if p.odometer is not None else self._integrate(state, p, fix_time, "no_fix" in flags)
        if device.speed_limit_kmh is not None and p.speed_kmh > device.speed_limit_kmh:
            events += (DeviceEvent(kind="overspeed", name="overspeed", code=0, value=int(p.speed_kmh)),)
        # Positional on purpose (see TrackedPosition): id, kind, imei, asset_id, company_id, display_name,
        # source, fix_time, received_at, lat, lng, speed_kmh, course, satellites, valid, moving, altitude,
        # ignition, odometer_m, external_voltage, battery_voltage, gsm_signal, address, flags, events, io.
        return TrackedPosition(
            record_id(device.imei, fix_time, kind),
            kind,
            device.imei,
            device.asset_id,
            device.company_id,
            device.display_name or device.asset_id,
            source,
            fix_time,
            received_at,
            p.lat,
            p.lng,
            p.speed_kmh,
            p.course,
            p.satellites,
            p.valid and not (flags and flags_invalidate(flags)),
            moving,
            p.altitude,
            p.ignition,
            None if odometer is None else int(odometer),
            p.external_voltage,
            p.battery_voltage,
            p.gsm_signal,
            None,
            tuple(flags),
            events,
            p.io,
        )

    def from_ingest(self, item: IngestPosition) -> TrackedPosition:
        """A driver's phone position through the same steps; the driver is an asset whose id is its user id."""
        device = Device(
            imei=f"{item.source}:{item.asset_id}",
            asset_id=item.asset_id,
            company_id=item.company_id,
            display_name=item.display_name,
        )
        position = Position(
            item.fix_time, item.lat, item.lng, item.speed_kmh, item.course % 361, 0, True
        )  # phones report no satellite count; validity comes from the flags
        record = self.enrich(device, item.source, position, item.received_at)
        return msgspec.structs.replace(record, imei="")

    def _flags(
        self, fix_time: datetime | None, lat: float, lng: float, course: int, valid: bool, received_at: datetime
    ) -> list[str]:
        flags = []
        if not valid:
            flags.append("no_fix")
        if fix_time is None:
            flags.append("no_time")
        elif fix_time < _Y2K:
            flags.append("before_2000")
        elif fix_time > received_at + self._max_future:
            flags.append("future_time")
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0):
            flags.append("out_of_range")
        if not 0 <= course <= 360:
            flags.append("bad_course")
        return flags

    def _state(self, asset_id: str) -> AssetState:
        state = self.assets.get(asset_id)
        if state is None:
            state = self.assets[asset_id] = AssetState()
        return state

    def _moving(self, state: AssetState, speed: float, ignition: bool | None, fix_time: datetime) -> bool:
        """Hysteresis: start above ``moving_start_kmh``, stop below ``moving_stop_kmh``; ignition off stops."""
        s = self.settings
        moving = speed >= (s.moving_stop_kmh if state.moving else s.moving_start_kmh)
        if ignition is False:
            moving = False
        if state.last_fix is None or fix_time >= state.last_fix:
            state.moving = moving
        return moving

    def _integrate(self, state: AssetState, p: Position, fix_time: datetime, no_fix: bool) -> float | None:
        """Odometer from distance between successive valid fixes (out-of-order fixes add nothing)."""
        if no_fix:
            return state.odometer_m if state.last_fix is not None else None
        if state.last_fix is not None and fix_time > state.last_fix and state.last_lat is not None:
            step = distance_m(state.last_lat, state.last_lng or 0.0, p.lat, p.lng)
            hours = (fix_time - state.last_fix).total_seconds() / 3600
            if step / 1000 <= self.settings.max_jump_kmh * max(hours, 1 / 3600):
                state.odometer_m += step
        if state.last_fix is None or fix_time > state.last_fix:
            state.last_fix, state.last_lat, state.last_lng = fix_time, p.lat, p.lng
        return state.odometer_m


def flags_invalidate(flags: Iterable[str]) -> bool:
    """Flags that make a fix unusable as a live position (it is still stored, flagged)."""
    return any(f in ("no_fix", "no_time", "before_2000", "future_time", "out_of_range") for f in flags)


def _io_events(p: Position) -> tuple[DeviceEvent, ...]:
    """The Teltonika event IO (the IO that triggered the record; 0 means periodic)."""
    if not p.event_io_id:
        return ()
    value = p.io.get(p.event_io_id)
    return (DeviceEvent(kind="io", name=f"io_{p.event_io_id}", code=p.event_io_id, value=value),)
