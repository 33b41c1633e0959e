"""The pure rules of tracking links: schedules (time zones, DST), status, geometry, the public payload, secrets."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from gateway.records import TrackedPosition, record_id
from relay.links.model import (
    Arrival,
    Schedule,
    ScheduleWindow,
    TrackingLink,
    arrived,
    code_hash,
    distance_km,
    eta_minutes,
    in_schedule,
    link_status,
    new_code,
    new_session_token,
    next_schedule_change,
    normalise_email,
    public_location,
    token_hash,
    zone,
)

WEEKDAYS = (0, 1, 2, 3, 4)
BERLIN_OFFICE = Schedule(timezone="Europe/Berlin", windows=(ScheduleWindow(days=WEEKDAYS, start="08:00", end="18:00"),))
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def link(**fields: object) -> TrackingLink:
    values: dict[str, object] = {"display_name": "Your delivery", "created_at": T0, "updated_at": T0, **fields}
    return TrackingLink(uuid="l1", company_id="company-secret", asset_id="asset-secret-7", **values)  # type: ignore[arg-type]


def position(lat: float = 52.52, lng: float = 13.405, **fields: object) -> TrackedPosition:
    values: dict[str, object] = {
        "display_name": "Truck 7 (internal name)",
        "source": "teltonika",
        "received_at": T0 + timedelta(seconds=2),
        "speed_kmh": 42.04,
        "course": 270,
        "satellites": 9,
        "valid": True,
        "moving": True,
        "altitude": 35,
        "ignition": True,
        "odometer_m": 123_456,
        "address": "internal enrichment",
        "io": {1: 1, 66: 12600},
        **fields,
    }
    return TrackedPosition(
        id=record_id("356307042441013", T0, "position"),
        kind="position",
        imei="356307042441013",
        asset_id="asset-secret-7",
        company_id="company-secret",
        fix_time=T0,
        lat=lat,
        lng=lng,
        **values,  # type: ignore[arg-type]
    )


# -- schedules ------------------------------------------------------------------------


def test_in_schedule_uses_the_schedules_time_zone() -> None:
    # Monday 2 March 2026, winter: Berlin is UTC+1, New York UTC-5.
    assert not in_schedule(BERLIN_OFFICE, utc(2026, 3, 2, 6, 59))  # 07:59 in Berlin
    assert in_schedule(BERLIN_OFFICE, utc(2026, 3, 2, 7, 0))  # 08:00 in Berlin: start is inclusive
    assert in_schedule(BERLIN_OFFICE, utc(2026, 3, 2, 16, 59))
    assert not in_schedule(BERLIN_OFFICE, utc(2026, 3, 2, 17, 0))  # 18:00 in Berlin: end is exclusive
    new_york = Schedule(timezone="America/New_York", windows=BERLIN_OFFICE.windows)
    assert not in_schedule(new_york, utc(2026, 3, 2, 7, 0))  # 02:00 in New York
    assert in_schedule(new_york, utc(2026, 3, 2, 13, 0))  # 08:00 in New York
    # The weekday is the local one: Saturday 00:30 in Berlin is still Friday in UTC.
    friday_night = Schedule(timezone="Europe/Berlin", windows=(ScheduleWindow(days=(5,), start="00:00", end="01:00"),))
    assert in_schedule(friday_night, utc(2026, 3, 6, 23, 30))


def test_in_schedule_aware_of_any_input_offset() -> None:
    tokyo_now = datetime(2026, 3, 2, 16, 0, tzinfo=zone("Asia/Tokyo"))  # 07:00 UTC, 08:00 Berlin
    assert in_schedule(BERLIN_OFFICE, tokyo_now)


def test_in_schedule_across_the_dst_change() -> None:
    # Europe/Berlin switches to summer time on the last Sunday of March: 29 March 2026, 01:00 UTC.
    sunday = Schedule(timezone="Europe/Berlin", windows=(ScheduleWindow(days=(6,), start="08:00", end="09:00"),))
    assert in_schedule(sunday, utc(2026, 3, 22, 7, 30))  # a week before: 08:30 CET
    assert not in_schedule(sunday, utc(2026, 3, 22, 6, 30))  # 07:30 CET
    assert in_schedule(sunday, utc(2026, 3, 29, 6, 30))  # the same local 08:30, now CEST
    assert not in_schedule(sunday, utc(2026, 3, 29, 7, 30))  # 09:30 CEST
    # The skipped hour: 02:00-03:00 local does not exist on that day.
    early = Schedule(timezone="Europe/Berlin", windows=(ScheduleWindow(days=(6,), start="02:00", end="04:00"),))
    assert not in_schedule(early, utc(2026, 3, 29, 0, 59))  # 01:59 CET
    assert in_schedule(early, utc(2026, 3, 29, 1, 0))  # 03:00 CEST


def test_window_ending_at_24_00() -> None:
    evening = Schedule(timezone="Europe/Berlin", windows=(ScheduleWindow(days=(5,), start="22:00", end="24:00"),))
    assert in_schedule(evening, utc(2026, 3, 7, 22, 59, 59))  # Saturday 23:59:59 in Berlin
    assert not in_schedule(evening, utc(2026, 3, 7, 23, 0))  # Sunday 00:00 in Berlin
    assert not in_schedule(evening, utc(2026, 3, 7, 20, 59))  # Saturday 21:59


def test_schedule_rejects_bad_clock_times_and_zones() -> None:
    decode = msgspec.json.Decoder(Schedule).decode
    for bad in ("24:01", "7:00", "12:60", "25:00"):
        with pytest.raises(msgspec.ValidationError):
            decode(f'{{"timezone": "UTC", "windows": [{{"days": [0], "start": "{bad}", "end": "24:00"}}]}}')
    with pytest.raises(msgspec.ValidationError):
        decode('{"timezone": "UTC", "windows": [{"days": [7], "start": "08:00", "end": "09:00"}]}')
    with pytest.raises(ValueError, match="Mars/Olympus"):
        zone("Mars/Olympus")
    with pytest.raises(ValueError):
        in_schedule(Schedule(timezone="Not/AZone", windows=()), T0)


def test_next_schedule_change_into_and_out_of_a_window() -> None:
    assert next_schedule_change(BERLIN_OFFICE, utc(2026, 3, 2, 5, 0)) == utc(2026, 3, 2, 7, 0)  # opens at 08:00
    assert next_schedule_change(BERLIN_OFFICE, utc(2026, 3, 2, 7, 0)) == utc(2026, 3, 2, 17, 0)  # at the start
    assert next_schedule_change(BERLIN_OFFICE, utc(2026, 3, 2, 12, 0)) == utc(2026, 3, 2, 17, 0)  # closes at 18:00
    # Friday evening: closed over the weekend, opens Monday 08:00.
    assert next_schedule_change(BERLIN_OFFICE, utc(2026, 3, 6, 17, 0)) == utc(2026, 3, 9, 7, 0)


def test_next_schedule_change_across_dst() -> None:
    # Saturday 28 March (CET) -> Monday 30 March 08:00 CEST = 06:00 UTC.
    assert next_schedule_change(BERLIN_OFFICE, utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 30, 6, 0)


def test_next_schedule_change_skips_touching_windows() -> None:
    split = Schedule(
        timezone="Europe/Berlin",
        windows=(
            ScheduleWindow(days=(0,), start="08:00", end="12:00"),
            ScheduleWindow(days=(0,), start="12:00", end="24:00"),
            ScheduleWindow(days=(1,), start="00:00", end="06:00"),
        ),
    )
    assert next_schedule_change(split, utc(2026, 3, 2, 8, 0)) == utc(2026, 3, 3, 5, 0)  # Tuesday 06:00 Berlin


def test_next_schedule_change_none_when_always_or_never_open() -> None:
    every_day = ScheduleWindow(days=tuple(range(7)), start="00:00", end="24:00")
    always = Schedule(timezone="Europe/Berlin", windows=(every_day,))
    never = Schedule(timezone="Europe/Berlin", windows=())
    no_days = Schedule(timezone="Europe/Berlin", windows=(ScheduleWindow(days=(), start="08:00", end="18:00"),))
    for now in (T0, utc(2026, 3, 28, 23, 30), utc(2026, 10, 24, 23, 30)):  # and both DST weekends
        assert in_schedule(always, now)
        assert next_schedule_change(always, now) is None
        assert not in_schedule(never, now)
        assert next_schedule_change(never, now) is None
        assert next_schedule_change(no_days, now) is None


# -- status -----------------------------------------------------------------------------


def test_link_status_order() -> None:
    past, closed = T0 - timedelta(hours=1), Schedule(timezone="UTC", windows=())
    assert link_status(link(), T0) == "active"
    assert link_status(link(schedule=closed), T0) == "outside_schedule"
    assert link_status(link(schedule=closed, expires_at=past), T0) == "expired"
    assert link_status(link(schedule=closed, expires_at=past, enabled=False), T0) == "disabled"
    assert link_status(link(enabled=False), T0) == "disabled"
    assert link_status(link(schedule=BERLIN_OFFICE), T0) == "active"  # Monday 13:00 in Berlin


def test_link_status_expires_at_boundary() -> None:
    expiring = link(expires_at=T0)
    assert link_status(expiring, T0 - timedelta(microseconds=1)) == "active"
    assert link_status(expiring, T0) == "expired"
    assert link_status(expiring, T0 + timedelta(days=365)) == "expired"


def test_link_status_expired_at_ends_the_link_before_expires_at() -> None:
    ended = link(expires_at=T0 + timedelta(days=1), expired_at=T0 - timedelta(minutes=5), expired_reason="arrival")
    assert link_status(ended, T0) == "expired"
    assert link_status(link(expired_at=T0, expired_reason="time"), T0) == "expired"


# -- geometry ----------------------------------------------------------------------------


def test_distance_km_known_values() -> None:
    assert distance_km(52.5200, 13.4050, 48.8566, 2.3522) == pytest.approx(878, abs=2)  # Berlin - Paris
    assert distance_km(52.52, 13.405, 52.52, 13.405) == 0
    assert distance_km(0, 0, 0, 180) == pytest.approx(20015.1, abs=0.1)  # half the equator
    assert distance_km(0, 179.9, 0, -179.9) == pytest.approx(22.24, abs=0.01)  # across the date line
    assert distance_km(89.9, 0, 89.9, 180) == pytest.approx(22.24, abs=0.01)  # across the pole


def test_arrived_within_and_outside_the_radius() -> None:
    destination = Arrival(lat=52.52, lng=13.405, radius_m=150)
    ahead = link(arrival=destination)
    metre_lat = 1 / 111_195  # degrees of latitude per metre on this sphere
    assert arrived(ahead, position(52.52, 13.405))
    assert arrived(ahead, position(52.52 + 149 * metre_lat, 13.405))
    assert not arrived(ahead, position(52.52 + 151 * metre_lat, 13.405))
    assert not arrived(link(), position(52.52, 13.405))  # no arrival: never


def test_eta_minutes() -> None:
    assert eta_minutes(10.0, 60.0) == 10.0
    assert eta_minutes(7.3, 50.0) == 8.8
    assert eta_minutes(0.0, 30.0) == 0.0
    assert eta_minutes(10.0, None) is None
    assert eta_minutes(10.0, 0.9) is None  # standing still is no speed to extrapolate


# -- the public payload ---------------------------------------------------------------------

BASE_KEYS = {"lat", "lng", "speed", "heading", "status", "display_name", "timestamp"}


def public_json(link: TrackingLink, record: TrackedPosition, address: str | None, speed: float | None) -> bytes:
    return msgspec.json.encode(public_location(link, record, address, speed))


def test_public_location_keys_without_arrival() -> None:
    body = public_json(link(), position(), "Unter den Linden 1, Berlin", 40.0)
    payload = msgspec.json.decode(body)
    assert set(payload) == BASE_KEYS | {"address"}
    assert payload == {
        "lat": 52.52,
        "lng": 13.405,
        "speed": 42.0,
        "heading": 270,
        "status": "moving",
        "display_name": "Your delivery",  # the link's name, not the asset's internal one
        "timestamp": "2026-03-02T12:00:00Z",
        "address": "Unter den Linden 1, Berlin",
    }
    assert set(msgspec.json.decode(public_json(link(), position(moving=False), None, None))) == BASE_KEYS


def test_public_location_keys_with_arrival() -> None:
    heading_home = link(arrival=Arrival(lat=48.8566, lng=2.3522))
    payload = msgspec.json.decode(public_json(heading_home, position(), "Berlin, Germany", 80.0))
    assert set(payload) == BASE_KEYS | {"address", "distance_km", "eta_minutes"}
    assert payload["distance_km"] == pytest.approx(878, abs=2)
    assert payload["eta_minutes"] == pytest.approx(878 / 80 * 60, abs=2)
    no_speed = msgspec.json.decode(public_json(heading_home, position(), None, None))
    assert set(no_speed) == BASE_KEYS | {"distance_km"}


def test_public_location_never_carries_internal_values() -> None:
    record = position()
    for shown in (link(), link(arrival=Arrival(lat=48.8566, lng=2.3522))):
        body = public_json(shown, record, None, 50.0)
        for secret in (record.imei, record.asset_id, record.company_id, record.id, record.display_name):
            assert secret.encode() not in body
        assert b"internal enrichment" not in body and b"12600" not in body


# -- secrets ----------------------------------------------------------------------------------


def test_session_tokens() -> None:
    tokens = {new_session_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert len(token) >= 43  # 256 bits in base64url
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    token = next(iter(tokens))
    assert token_hash(token) == token_hash(token)
    assert re.fullmatch(r"[0-9a-f]{64}", token_hash(token))
    assert token_hash(token) != token_hash(token + "x")
    assert token not in token_hash(token)


def test_codes_and_their_keyed_hash() -> None:
    codes = [new_code() for _ in range(500)]
    assert all(re.fullmatch(r"[0-9]{6}", c) for c in codes)
    assert len(set(codes)) > 450  # a million possibilities: few repeats
    digest = code_hash("secret-1", "l1", "a@example.com", "012345")
    assert digest == code_hash("secret-1", "l1", "a@example.com", "012345")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != code_hash("secret-2", "l1", "a@example.com", "012345")  # keyed
    assert digest != code_hash("secret-1", "l2", "a@example.com", "012345")  # bound to the link
    assert digest != code_hash("secret-1", "l1", "b@example.com", "012345")  # and to the address
    assert digest != code_hash("secret-1", "l1", "a@example.com", "012346")


def test_normalise_email() -> None:
    assert normalise_email("  Jane.Doe@Example.COM \n") == "jane.doe@example.com"
