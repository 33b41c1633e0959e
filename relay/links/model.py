"""Tracking links as data: records, status rules, schedule windows, ETA and the public payload.

Pure functions only (time is an argument), so every rule is tested without a
clock. What a viewer may see is decided in exactly one place,
:func:`public_location`: latitude, longitude, speed, heading, moving/stopped,
address, the link's display name, the fix time, and distance/ETA when the
link expires on arrival. Never an IMEI, asset id, device id, company or
account, history, or any other asset.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from gateway.records import TrackedPosition

AccessMode = Literal["public", "email", "email_code", "authorized_only"]
Status = Literal["active", "expired", "disabled", "outside_schedule"]
ExpiredReason = Literal["time", "arrival", "disabled", "deleted"]

ACCESS_MODES: tuple[str, ...] = ("public", "email", "email_code", "authorized_only")
DEFAULT_SESSION_TTL_S = 4 * 3600
CODE_TTL_S = 600  # an e-mailed code is valid for 10 minutes
CODE_ATTEMPTS = 5  # wrong codes allowed before the code is void
EARTH_RADIUS_KM = 6371.0088

_HHMM = Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$")]


class ScheduleWindow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Local times on some weekdays (0 = Monday ... 6 = Sunday) when the link shows the vehicle."""

    days: tuple[Annotated[int, msgspec.Meta(ge=0, le=6)], ...]
    start: _HHMM  # "08:00"
    end: _HHMM  # "18:30"; "24:00" is the end of the day; a window never crosses midnight


class Schedule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    timezone: str  # IANA name, e.g. "Europe/Berlin"
    windows: tuple[ScheduleWindow, ...]


class Arrival(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The link expires when the vehicle comes within ``radius_m`` of the destination."""

    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)]
    lng: Annotated[float, msgspec.Meta(ge=-180, le=180)]
    radius_m: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 150.0


class TrackingLink(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One shared link. ``asset_id`` is the vehicle shown now; a link for a job (``job_id``) can be moved
    to another vehicle, which tells its viewers ``vehicle.changed``."""

    uuid: str
    company_id: str
    asset_id: str
    display_name: str
    access_mode: AccessMode = "public"
    allowed_emails: tuple[str, ...] = ()  # authorized_only (lower-cased)
    job_id: str | None = None
    expires_at: datetime | None = None
    arrival: Arrival | None = None
    schedule: Schedule | None = None
    session_ttl_s: int = DEFAULT_SESSION_TTL_S
    enabled: bool = True
    created_at: datetime
    updated_at: datetime
    expired_at: datetime | None = None  # set when the link ended by itself (arrival) or by time
    expired_reason: ExpiredReason | None = None


class LinkSession(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A viewer's session: only the hash of its token is stored; it opens exactly one link."""

    token_hash: str
    link_uuid: str
    created_at: datetime
    expires_at: datetime
    email: str | None = None


class EmailCode(msgspec.Struct, frozen=True, kw_only=True):
    """A pending 6-digit code: stored as a keyed hash, valid ``CODE_TTL_S``, ``attempts_left`` wrong tries."""

    link_uuid: str
    email: str
    code_hash: str
    expires_at: datetime
    attempts_left: int = CODE_ATTEMPTS


class PublicLocation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The one payload a viewer receives (WebSocket ``location.updated`` and polling)."""

    lat: float
    lng: float
    speed: float  # km/h
    heading: int  # degrees
    status: Literal["moving", "stopped"]
    display_name: str
    timestamp: datetime  # fix time, UTC
    address: str | None = None
    distance_km: float | None = None  # only with arrival expiration
    eta_minutes: float | None = None  # only with arrival expiration, when a recent moving speed is known


# --- status -----------------------------------------------------------------------------------


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def _clock(text: str) -> time:
    return time.max if text == "24:00" else time.fromisoformat(text)


def in_schedule(schedule: Schedule, now: datetime) -> bool:
    """True when ``now`` (aware) falls inside one of the windows, in the schedule's time zone."""
    local = now.astimezone(zone(schedule.timezone))
    weekday, clock = local.weekday(), local.time().replace(tzinfo=None)
    return any(weekday in w.days and _clock(w.start) <= clock < _clock(w.end) for w in schedule.windows)


def next_schedule_change(schedule: Schedule, now: datetime) -> datetime | None:
    """The next instant (UTC) after ``now`` at which :func:`in_schedule` changes, within 8 days; None if never."""
    tz = zone(schedule.timezone)
    today = now.astimezone(tz).date()
    boundaries: list[datetime] = []
    for offset in range(9):
        day = today + timedelta(days=offset)
        for window in schedule.windows:
            if day.weekday() in window.days:
                boundaries += [_local(day, window.start, tz), _local(day, window.end, tz)]
    inside = in_schedule(schedule, now)
    for boundary in sorted(b for b in boundaries if b > now):
        if in_schedule(schedule, boundary) != inside:
            return boundary
    return None


def _local(day: date, hhmm: str, tz: ZoneInfo) -> datetime:
    if hhmm == "24:00":
        return datetime.combine(day + timedelta(days=1), time(), tz).astimezone(UTC)
    return datetime.combine(day, time.fromisoformat(hhmm), tz).astimezone(UTC)


def link_status(link: TrackingLink, now: datetime) -> Status:
    """``disabled``, ``expired`` (by time, arrival or deletion), ``outside_schedule`` or ``active``, in that order."""
    if not link.enabled:
        return "disabled"
    if link.expired_at is not None or (link.expires_at is not None and now >= link.expires_at):
        return "expired"
    if link.schedule is not None and not in_schedule(link.schedule, now):
        return "outside_schedule"
    return "active"


# --- geometry and the public payload --------------------------------------------------------


def distance_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def arrived(link: TrackingLink, record: TrackedPosition) -> bool:
    a = link.arrival
    return a is not None and distance_km(record.lat, record.lng, a.lat, a.lng) * 1000 <= a.radius_m


def eta_minutes(remaining_km: float, recent_speed_kmh: float | None) -> float | None:
    """Straight-line distance at the vehicle's recent average moving speed; None without a usable speed."""
    if recent_speed_kmh is None or recent_speed_kmh < 1.0:
        return None
    return round(remaining_km / recent_speed_kmh * 60, 1)


def public_location(
    link: TrackingLink, record: TrackedPosition, address: str | None, recent_speed_kmh: float | None
) -> PublicLocation:
    """What a viewer of ``link`` sees of ``record`` (see the module docstring)."""
    remaining = eta = None
    if link.arrival is not None:
        remaining = round(distance_km(record.lat, record.lng, link.arrival.lat, link.arrival.lng), 2)
        eta = eta_minutes(remaining, recent_speed_kmh)
    return PublicLocation(
        lat=round(record.lat, 6),
        lng=round(record.lng, 6),
        speed=round(record.speed_kmh, 1),
        heading=record.course,
        status="moving" if record.moving else "stopped",
        display_name=link.display_name,
        timestamp=record.fix_time,
        address=address,
        distance_km=remaining,
        eta_minutes=eta,
    )


# --- secrets ----------------------------------------------------------------------------------


def new_session_token() -> str:
    """256 random bits, URL-safe; only :func:`token_hash` of it is ever stored."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_code() -> str:
    return f"{secrets.randbelow(1_000_000):06d}"


def code_hash(secret: str, link_uuid: str, email: str, code: str) -> str:
    """Keyed, so a leaked store does not give the million possible codes away by brute force."""
    return hmac.new(secret.encode(), f"{link_uuid}:{email}:{code}".encode(), hashlib.sha256).hexdigest()


def normalise_email(email: str) -> str:
    return email.strip().lower()
