"""Teltonika TCP/UDP behaviour beyond single fixtures: ACKs, counts, commands, handshake, keep-alive."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from trackcodecs import AvlPacket, Command, CommandResponse, ImeiPacket, Keepalive, Unsupported
from trackcodecs.errors import CodecError
from trackcodecs.teltonika import (
    TeltonikaDecoder,
    ack_for,
    encode_command,
    encode_command_14,
    frame_data_field,
    imei_reply,
    luhn_ok,
)
from trackcodecs.teltonika_udp import ack_for as udp_ack_for
from trackcodecs.teltonika_udp import decode_datagram

T0 = datetime(2026, 2, 1, 8, 30, tzinfo=UTC)


def record_8e(when: datetime, lat: float, lng: float, io1: dict[int, int], nx: dict[int, bytes] | None = None) -> bytes:
    ms = int(when.timestamp() * 1000)
    out = struct.pack(">QBiihHBH", ms, 1, round(lng * 1e7), round(lat * 1e7), -12, 270, 9, 88)
    out += struct.pack(">HH", 239, len(io1) + len(nx or {}))
    out += struct.pack(">H", len(io1)) + b"".join(struct.pack(">HB", k, v) for k, v in io1.items())
    out += struct.pack(">HHH", 0, 0, 0)
    nx = nx or {}
    out += struct.pack(">H", len(nx)) + b"".join(struct.pack(">HH", k, len(v)) + v for k, v in nx.items())
    return out


def packet(codec: int, records: list[bytes], n2: int | None = None) -> bytes:
    n = len(records)
    return frame_data_field(bytes((codec, n)) + b"".join(records) + bytes((n if n2 is None else n2,)))


def decode(data: bytes) -> list[object]:
    decoder = TeltonikaDecoder()
    decoder.receive_data(data)
    decoder.receive_eof()
    return decoder.events()  # type: ignore[return-value]


def test_ack_is_the_record_count() -> None:
    records = [record_8e(T0, 54.6872, 25.2797, {239: 1, 240: 0}) for _ in range(14)]
    (event,) = decode(packet(0x8E, records))
    assert isinstance(event, AvlPacket) and len(event.positions) == 14
    assert ack_for(event) == b"\x00\x00\x00\x0e"
    assert ack_for(event, accepted=3) == b"\x00\x00\x00\x03"


def test_8e_fields_signs_and_nx_group() -> None:
    vin = b"WVWZZZ1JZXW000001"
    (event,) = decode(packet(0x8E, [record_8e(T0, -33.8688, -70.6693, {239: 1, 240: 1, 21: 4}, {256: vin})]))
    assert isinstance(event, AvlPacket)
    (p,) = event.positions
    assert (p.fix_time, round(p.lat, 7), round(p.lng, 7)) == (T0, -33.8688, -70.6693)
    assert (p.altitude, p.course, p.satellites, p.speed_kmh, p.priority) == (-12, 270, 9, 88.0, 1)
    assert (p.ignition, p.movement, p.gsm_signal, p.event_io_id, p.valid) == (True, True, 4, 239, True)
    assert p.io[256] == vin.hex()


def test_layout_change_between_records_is_decoded_right() -> None:
    """Records of different IO layouts in one packet: the compiled layout must not be reused wrongly."""
    a = record_8e(T0, 1, 1, {239: 1})
    b = record_8e(T0, 2, 2, {239: 0, 240: 1, 21: 3})
    c = record_8e(T0, 3, 3, {239: 1}, {387: b"+5443.2+02516.7/"})
    (event,) = decode(packet(0x8E, [a, a, b, b, a, c, b]))
    assert isinstance(event, AvlPacket)
    assert [len(p.io) for p in event.positions] == [1, 1, 3, 3, 1, 2, 3]
    assert [p.ignition for p in event.positions] == [True, True, False, False, True, True, False]
    assert [round(p.lat) for p in event.positions] == [1, 1, 2, 2, 1, 3, 2]


def test_count_mismatch_and_crc_are_rejected() -> None:
    good = packet(0x8E, [record_8e(T0, 1, 1, {239: 1})])
    with pytest.raises(CodecError) as info:
        decode(packet(0x8E, [record_8e(T0, 1, 1, {239: 1})], n2=2))
    assert info.value.reason == "count_mismatch"
    corrupt = good[:-1] + bytes((good[-1] ^ 1,))
    with pytest.raises(CodecError) as info:
        decode(corrupt)
    assert info.value.reason == "bad_crc"
    decoder = TeltonikaDecoder(crc_policy="count")
    decoder.receive_data(corrupt)
    (event,) = decoder.events()
    assert isinstance(event, AvlPacket) and event.crc_ok is False and decoder.crc_mismatches == 1


def test_handshake_keepalive_and_data_in_one_stream() -> None:
    imei = b"\x00\x0f356307042441013"
    events = decode(b"\xff" + imei + packet(0x08, []) + b"\xff")
    assert [type(e) for e in events] == [Keepalive, ImeiPacket, AvlPacket, Keepalive]
    assert imei_reply(True) == b"\x01" and imei_reply(False) == b"\x00"
    assert luhn_ok("356307042441013") and not luhn_ok("356307042441014")


def test_codec_12_and_14_encoders_and_answers() -> None:
    assert encode_command("getinfo").hex() == "000000000000000f0c010500000007676574696e666f0100004312"
    (cmd,) = decode(encode_command_14("352093081452251", "getver"))
    assert isinstance(cmd, Command) and (cmd.codec, cmd.imei, cmd.text) == (14, "352093081452251", "getver")
    imei = bytes.fromhex("0352093081452251")
    ok = frame_data_field(b"\x0e\x01\x06" + struct.pack(">I", 8 + 3) + imei + b"Ver" + b"\x01")
    nack = frame_data_field(b"\x0e\x01\x11" + struct.pack(">I", 8) + imei + b"\x01")
    ts = struct.pack(">I", int(T0.timestamp()))
    c13 = frame_data_field(b"\x0d\x01\x06" + struct.pack(">I", 4 + 5) + ts + b"hello" + b"\x01")
    a, b, c = decode(ok + nack + c13)
    assert isinstance(a, CommandResponse) and (a.message_type, a.imei, a.text) == (6, "352093081452251", "Ver")
    assert isinstance(b, CommandResponse) and (b.message_type, b.text) == (0x11, "")
    assert isinstance(c, CommandResponse) and (c.codec, c.timestamp, c.text) == (13, T0, "hello")


def test_codec_7_is_unsupported_and_never_acked() -> None:
    (event,) = decode(frame_data_field(b"\x07\x01" + bytes(20) + b"\x01"))
    assert isinstance(event, Unsupported) and event.msg_type == 7


def test_udp_datagram_and_ack_echo_the_ids() -> None:
    imei = b"352093086403655"
    body = bytes((0x8E, 2)) + record_8e(T0, 5, 6, {239: 1}) * 2 + b"\x02"
    inner = struct.pack(">HBBH", 0xBEEF, 1, 0x42, len(imei)) + imei + body
    event = decode_datagram(struct.pack(">H", len(inner)) + inner)
    assert isinstance(event, AvlPacket) and event.imei == imei.decode() and len(event.positions) == 2
    assert udp_ack_for(event).hex() == "0005beef014202"
    with pytest.raises(CodecError) as info:
        decode_datagram(struct.pack(">H", len(inner) + 1) + inner)
    assert info.value.reason == "bad_length"


def _record(codec: int, io: dict[int, int]) -> bytes:
    ms = int(T0.timestamp() * 1000)
    out = struct.pack(">QBiihHBH", ms, 0, 251234567, 546789012, 100, 45, 7, 60)
    if codec == 0x08:
        out += bytes((21, len(io), len(io))) + b"".join(struct.pack(">BB", k, v) for k, v in io.items()) + bytes(3)
    elif codec == 0x10:
        out += struct.pack(">HBB", 21, 7, len(io)) + bytes((len(io),))
        out += b"".join(struct.pack(">HB", k, v) for k, v in io.items()) + bytes(3)
    else:
        out += struct.pack(">HHH", 21, len(io), len(io)) + b"".join(struct.pack(">HB", k, v) for k, v in io.items())
        out += bytes(8)
    return out


@pytest.mark.parametrize("codec", [0x08, 0x8E, 0x10])
def test_repeated_layout_decodes_like_the_first_record(codec: int) -> None:
    """The first record of a layout is walked, the next ones use the compiled layout: same result."""
    record = _record(codec, {239: 1, 21: 3, 240: 0})
    (event,) = decode(packet(codec, [record] * 3))
    assert isinstance(event, AvlPacket)
    first, second, third = event.positions
    assert first == second == third
    assert first.event_io_id == 21 and first.io == {239: 1, 21: 3, 240: 0}
    assert first.generation_type == (7 if codec == 0x10 else None)
