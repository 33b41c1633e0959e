"""GT06 behaviour beyond single fixtures: replies, time zones, hemispheres, resync, CRC policy, commands."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest

from trackcodecs import Alarm, Command, CommandResponse, Heartbeat, Location, Login, Unsupported
from trackcodecs.errors import CodecError
from trackcodecs.gt06 import Gt06Decoder, ack, build_frame, encode_command, reply_for, time_reply

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def gps_block(when: datetime, lat: float, lng: float, *, course: int = 90, positioned: bool = True) -> bytes:
    status = course | (0x1000 if positioned else 0) | (0x0400 if lat >= 0 else 0) | (0x0800 if lng < 0 else 0)
    date = bytes((when.year - 2000, when.month, when.day, when.hour, when.minute, when.second))
    coords = struct.pack(">II", round(abs(lat) * 1_800_000), round(abs(lng) * 1_800_000))
    return date + b"\xc9" + coords + b"\x3c" + struct.pack(">H", status)


CELL = bytes.fromhex("01cc00287d001fb8")


def decode(*frames: bytes, **options: object) -> list[object]:
    decoder = Gt06Decoder(**options)  # type: ignore[arg-type]
    decoder.receive_data(b"".join(frames))
    return decoder.events()  # type: ignore[return-value]


def test_replies_echo_the_serial_with_a_valid_crc() -> None:
    assert ack(0x01, 1).hex() == "787805010001d9dc0d0a"
    assert ack(0x01, 2).hex() == "787805010002eb470d0a"
    assert ack(0x13, 0x11).hex() == "78780513001 1f9700d0a".replace(" ", "")
    assert ack(0x26, 0x1C).hex() == "78780526001c9d860d0a"
    assert time_reply(6, datetime(2015, 12, 29, 0, 0, 21, tzinfo=UTC)).hex() == "78780b8a0f0c1d0000150006f0860d0a"
    # The time reply is UTC whatever zone the server clock is given in.
    local = datetime(2015, 12, 29, 2, 0, 21, tzinfo=UTC).astimezone(tz=None)
    assert time_reply(6, local - timedelta(hours=2)) == time_reply(6, datetime(2015, 12, 29, 0, 0, 21, tzinfo=UTC))


def test_reply_only_for_the_types_that_need_one() -> None:
    fix = gps_block(NOW, 1, 1)
    login = build_frame(0x01, bytes.fromhex("0123456789012345"), 7)
    location = build_frame(0x12, fix + CELL, 8)
    heartbeat = build_frame(0x13, bytes.fromhex("4004040001"), 9)
    alarm = build_frame(0x16, fix + b"\x09" + CELL + bytes.fromhex("6506040101"), 10)
    events = decode(login, location, heartbeat, alarm)
    replies = [reply_for(e, NOW) for e in events]  # type: ignore[arg-type]
    assert replies == [ack(0x01, 7), None, ack(0x13, 9), ack(0x16, 10)]


def test_login_time_zone_applies_to_device_time_types_only() -> None:
    when = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    login = build_frame(0x01, bytes.fromhex("0123456789012345") + bytes.fromhex("36083200"), 1)  # GMT+8
    local = build_frame(0x12, gps_block(when, 22.5, 114.0) + CELL, 2)
    utc = build_frame(0x22, gps_block(when, 22.5, 114.0) + CELL + b"\x01\x00\x00", 3)
    first, located, utc_located = decode(login, local, utc)
    assert isinstance(first, Login) and first.tz_offset_min == 480 and first.model_code == 0x3608
    assert isinstance(located, Location) and located.position.fix_time == when - timedelta(hours=8)
    assert isinstance(utc_located, Location) and utc_located.position.fix_time == when
    assert utc_located.position.ignition is True and utc_located.position.historical is False
    # A configured offset wins over the login's.
    _, configured, _ = decode(login, local, utc, local_offset_min=-60)
    assert configured.position.fix_time == when + timedelta(hours=1)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("raw", "minutes"), [("3200", 480), ("4dd8", -765), ("190a", -240), ("0000", 0)])
def test_login_time_zone_field(raw: str, minutes: int) -> None:
    (login,) = decode(build_frame(0x01, bytes.fromhex("0123456789012345" + "7000" + raw), 1))
    assert isinstance(login, Login) and login.tz_offset_min == minutes


@pytest.mark.parametrize(("lat", "lng"), [(23.1, 114.4), (-33.8688, 151.2093), (40.7128, -74.006), (-22.9, -43.2)])
def test_hemisphere_signs(lat: float, lng: float) -> None:
    (event,) = decode(build_frame(0x12, gps_block(NOW, lat, lng) + CELL, 1))
    assert isinstance(event, Location)
    assert (round(event.position.lat, 4), round(event.position.lng, 4)) == (lat, lng)
    assert event.position.valid


def test_unpositioned_and_undated_fixes_are_flagged_not_dropped() -> None:
    unpositioned = build_frame(0x12, gps_block(NOW, 10, 10, positioned=False) + CELL, 1)
    undated = build_frame(0x12, bytes(6) + gps_block(NOW, 10, 10)[6:] + CELL, 2)
    a, b = decode(unpositioned, undated)
    assert isinstance(a, Location) and not a.position.valid and a.position.fix_time == NOW
    assert isinstance(b, Location) and not b.position.valid and b.position.fix_time is None


def test_garbage_is_skipped_and_counted() -> None:
    frame = build_frame(0x13, bytes.fromhex("4004040001"), 5)
    decoder = Gt06Decoder()
    decoder.receive_data(b"\x00\x01\x79" + frame + b"\x0d\x0a\xff" + frame)
    events = decoder.events()
    assert [type(e) for e in events] == [Heartbeat, Heartbeat]
    assert decoder.discarded_bytes == 6


def test_false_start_marker_inside_garbage() -> None:
    """78 78 followed by a length whose frame does not end in 0D 0A is skipped, and the real frame found."""
    frame = build_frame(0x13, bytes.fromhex("4004040001"), 5)
    (event,) = decode(b"\x78\x78\x05\x01\x02\x03\x04\x05\x06\x07" + frame)
    assert isinstance(event, Heartbeat) and event.serial == 5


def test_crc_policy() -> None:
    frame = bytearray(build_frame(0x13, bytes.fromhex("4004040001"), 5))
    frame[-3] ^= 0xFF
    with pytest.raises(CodecError) as info:
        decode(bytes(frame))
    assert info.value.reason == "bad_crc"
    decoder = Gt06Decoder(crc_policy="count")
    decoder.receive_data(bytes(frame))
    (event,) = decoder.events()
    assert isinstance(event, Heartbeat) and event.crc_ok is False and decoder.crc_mismatches == 1


def test_alarm_with_fence_and_status() -> None:
    body = gps_block(NOW, 1, 2) + b"\x09" + CELL + bytes.fromhex("0a06040502") + b"\x03"
    (event,) = decode(build_frame(0x27, body, 0x33))
    assert isinstance(event, Alarm)
    assert (event.alarm, event.alarm_code, event.fence) == ("geofence_exit", 5, 3)
    assert event.status.acc is True and event.status.alarm_bits == 1
    assert event.position is not None and event.position.ignition is True
    assert reply_for(event, NOW) == ack(0x27, 0x33)


def test_command_round_trip_and_reply() -> None:
    command = encode_command("DYD,000000#", serial=3, server_flag=0x01020304)
    (sent,) = decode(command)
    assert isinstance(sent, Command) and sent.text == "DYD,000000#" and sent.server_flag == 0x01020304
    answer = build_frame(0x15, bytes((4 + 9,)) + bytes.fromhex("01020304") + b"DYD=Succ!" + b"\x00\x02", 4)
    long_answer = build_frame(0x21, bytes.fromhex("01020304") + b"\x02" + "Ölsperre".encode("utf-16-be"), 5)
    short, utf16 = decode(answer, long_answer)
    assert isinstance(short, CommandResponse) and short.text == "DYD=Succ!" and short.server_flag == 0x01020304
    assert isinstance(utf16, CommandResponse) and utf16.text == "Ölsperre"
    big = build_frame(0x21, bytes(4) + b"\x01" + b"x" * 300, 6)
    assert big[:2] == b"\x79\x79"
    (long_event,) = decode(big)
    assert isinstance(long_event, CommandResponse) and long_event.text == "x" * 300


def test_unknown_type_is_unsupported_not_an_error() -> None:
    (event,) = decode(build_frame(0xF7, b"\x01\x02", 9))
    assert isinstance(event, Unsupported) and event.msg_type == 0xF7 and event.payload_hex == "0102"
    assert reply_for(event, NOW) is None


def test_short_content_is_malformed() -> None:
    with pytest.raises(CodecError) as info:
        decode(build_frame(0x12, b"\x01\x02\x03", 1))
    assert info.value.reason == "malformed"


def test_impossible_length_in_garbage_is_skipped() -> None:
    """A start marker with L < 5 cannot be a frame: it is skipped, the frames around it decode."""
    login = build_frame(0x01, bytes.fromhex("0123456789012345"), 1)
    heartbeat = build_frame(0x13, bytes.fromhex("4004040001"), 2)
    decoder = Gt06Decoder()
    decoder.receive_data(login + bytes.fromhex("787800ff") + heartbeat)
    assert [type(e) for e in decoder.events()] == [Login, Heartbeat]
    assert decoder.discarded_bytes == 4


def test_0x11_has_a_wide_mnc_and_cell_id() -> None:
    cell = bytes.fromhex("012e02d075df0084890c")  # MCC 302, MNC 720 (2 bytes), LAC 0x75DF, cell 0x0084890C
    (event,) = decode(build_frame(0x11, gps_block(NOW, 43.97, -79.26) + cell, 6))
    assert isinstance(event, Location) and event.cell is not None
    assert (event.cell.mcc, event.cell.mnc, event.cell.lac, event.cell.cell_id) == (302, 720, 0x75DF, 0x0084890C)
