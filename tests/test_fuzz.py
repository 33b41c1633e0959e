"""Random input: only CodecError escapes, buffers stay bounded, decoded positions are plausible or flagged."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trackcodecs import AvlPacket, Event, Position
from trackcodecs.errors import CodecError
from trackcodecs.gt06 import Gt06Decoder, build_frame
from trackcodecs.stream import StreamDecoder
from trackcodecs.teltonika import TeltonikaDecoder, frame_data_field
from trackcodecs.teltonika_udp import decode_datagram

SMALL_MAX = 512
CHUNKED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _positions(events: list[Event]) -> list[Position]:
    out: list[Position] = []
    for event in events:
        if isinstance(event, AvlPacket):
            out.extend(event.positions)
        elif (p := getattr(event, "position", None)) is not None:
            out.append(p)
    return out


def check_plausible(position: Position) -> None:
    """Invariants every decoded position holds; range checks bind whenever ``valid`` is set."""
    assert position.fix_time is None or position.fix_time.utcoffset() is not None
    assert position.satellites >= 0 and position.speed_kmh >= 0 and position.course >= 0
    assert math.isfinite(position.lat) and math.isfinite(position.lng)
    if position.valid:
        assert -90 <= position.lat <= 90 and -180 <= position.lng <= 180
        assert 0 <= position.course <= 360
        assert position.fix_time is not None and position.fix_time >= datetime(2000, 1, 1, tzinfo=UTC)
        assert (position.lat, position.lng) != (0.0, 0.0)


def feed(decoder: StreamDecoder, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            assert decoder.buffered <= SMALL_MAX
            events.extend(decoder.events())
        decoder.receive_eof()
    except CodecError as exc:
        assert exc.reason and exc.reason.replace("_", "").isalpha()
    events.extend(decoder.events())
    for position in _positions(events):
        check_plausible(position)
    return events


chunks = st.lists(st.binary(max_size=64), max_size=12)


@CHUNKED
@given(chunks)
def test_gt06_random_bytes(data: list[bytes]) -> None:
    feed(Gt06Decoder(max_frame=SMALL_MAX), data)


@CHUNKED
@given(chunks)
def test_teltonika_random_bytes(data: list[bytes]) -> None:
    feed(TeltonikaDecoder(max_frame=SMALL_MAX), data)


@CHUNKED
@given(st.binary(max_size=300))
def test_udp_random_bytes(data: bytes) -> None:
    try:
        event = decode_datagram(data, max_frame=SMALL_MAX)
    except CodecError:
        return
    for position in _positions([event]):
        check_plausible(position)


# Random content inside valid framing reaches the field decoders, not just the framers.


@CHUNKED
@given(st.integers(0, 0xFF), st.binary(max_size=60), st.integers(0, 0xFFFF), st.sampled_from(["reject", "count"]))
def test_gt06_random_content_in_valid_frames(msg_type: int, content: bytes, serial: int, policy: str) -> None:
    frame = build_frame(msg_type, content, serial)
    feed(Gt06Decoder(crc_policy=policy), [frame[:7], frame[7:]])  # type: ignore[arg-type]


@CHUNKED
@given(st.sampled_from([0x08, 0x8E, 0x10, 0x0C, 0x0D, 0x0E, 0x0F, 0x07]), st.integers(0, 5), st.binary(max_size=200))
def test_teltonika_random_records_in_valid_packets(codec: int, count: int, body: bytes) -> None:
    packet = frame_data_field(bytes((codec, count)) + body + bytes((count,)))
    feed(TeltonikaDecoder(), [packet])


@CHUNKED
@given(st.binary(min_size=24, max_size=24), st.integers(0, 3))
def test_teltonika_random_record_headers(header: bytes, io_count: int) -> None:
    """Any header with a well-formed codec 8 IO section decodes; positions are flagged when implausible."""
    io = bytes((0, io_count, io_count)) + b"".join(struct.pack(">BB", 239 + i, 1) for i in range(io_count)) + b"\0\0\0"
    packet = frame_data_field(b"\x08\x01" + header + io + b"\x01")
    events = feed(TeltonikaDecoder(), [packet])
    assert len(events) == 1 and isinstance(events[0], AvlPacket)


def test_declared_length_over_limit_fails_before_buffering() -> None:
    decoder = TeltonikaDecoder(max_frame=1024)
    header = b"\0\0\0\0" + struct.pack(">I", 5000)
    try:
        decoder.receive_data(header)
    except CodecError as exc:
        assert exc.reason == "frame_too_large"
    else:
        raise AssertionError("no error for an oversize declared length")
    assert decoder.buffered == 0
    gt = Gt06Decoder(max_frame=1024)
    try:
        gt.receive_data(b"\x79\x79\x20\x00")
    except CodecError as exc:
        assert exc.reason == "frame_too_large"
    else:
        raise AssertionError("no error for an oversize GT06 frame")


def test_error_is_final() -> None:
    decoder = TeltonikaDecoder()
    for _ in range(2):
        try:
            decoder.receive_data(b"\x12\x34\x56")
        except CodecError as exc:
            assert exc.reason == "bad_imei"
        else:
            raise AssertionError("expected bad_imei")


def test_trickled_bytes_are_buffered_not_decoded_again() -> None:
    """A frame arriving byte by byte is held until complete (the buffer grows to one frame, no further)."""
    packet = frame_data_field(b"\x0c\x01\x05\x00\x00\x00\x07getinfo\x01")
    decoder = TeltonikaDecoder()
    for i, byte in enumerate(packet[:-1]):
        decoder.receive_data(bytes((byte,)))
        assert decoder.buffered == i + 1
        assert decoder.events() == []
    decoder.receive_data(packet[-1:])
    assert decoder.buffered == 0
    assert len(decoder.events()) == 1
