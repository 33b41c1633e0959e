"""Teltonika AVL records, shared by the TCP packets and the UDP datagrams (protocols.md 2.3, 2.4).

Speed matters here: a busy gateway decodes hundreds of thousands of records
a second. Each IO group is read with one ``struct`` call whose format is
built once per (layout, count) and cached, instead of one call per element.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

from .errors import MalformedPayload
from .events import IoValue, Position

CODEC_8 = 0x08
CODEC_8E = 0x8E
CODEC_16 = 0x10
AVL_CODECS = frozenset({CODEC_8, CODEC_8E, CODEC_16})

# timestamp u64 ms, priority, longitude i32, latitude i32, altitude i16, angle, satellites, speed
_HEADER = struct.Struct(">QBiihHBH")
_HEADER_SIZE = _HEADER.size
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = int((datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH).total_seconds() * 1000)

# Per codec: (event id + counts header, width of the counts, id format char)
#   codec 8:  event id u8,  N total u8,                 counts u8,  ids u8
#   codec 8E: event id u16, N total u16,                counts u16, ids u16, plus the NX group
#   codec 16: event id u16, generation type u8, N u8,   counts u8,  ids u16
_LAYOUT = {
    CODEC_8: (struct.Struct(">BB"), _U8, "B"),
    CODEC_8E: (struct.Struct(">HH"), _U16, "H"),
    CODEC_16: (struct.Struct(">HBB"), _U8, "H"),
}
_VALUE_CHARS = ("B", "H", "I", "Q")
_groups: dict[tuple[str, int], struct.Struct] = {}


def _group_struct(id_char: str, value_char: str, count: int) -> struct.Struct:
    key = (id_char + value_char, count)
    s = _groups.get(key)
    if s is None:
        s = _groups[key] = struct.Struct(">" + (id_char + value_char) * count)
    return s


def decode_records(codec: int, data: bytes, pos: int, end: int, count: int) -> tuple[list[Position], int]:
    """Decode ``count`` records of ``codec`` from ``data[pos:end]``; return them and the next offset."""
    head_struct, count_struct, id_char = _LAYOUT[codec]
    count_size = count_struct.size
    records = []
    unpack_header = _HEADER.unpack_from
    for _ in range(count):
        if pos + _HEADER_SIZE > end:
            raise MalformedPayload("AVL record header runs past the end of the packet")
        ms, priority, lng_raw, lat_raw, altitude, angle, sats, speed = unpack_header(data, pos)
        pos += _HEADER_SIZE
        if pos + head_struct.size > end:
            raise MalformedPayload("AVL IO header runs past the end of the packet")
        head = head_struct.unpack_from(data, pos)
        pos += head_struct.size
        io: dict[int, IoValue] = {}
        for value_char in _VALUE_CHARS:
            if pos + count_size > end:
                raise MalformedPayload("AVL IO count runs past the end of the packet")
            n = count_struct.unpack_from(data, pos)[0]
            pos += count_size
            if n:
                group = _group_struct(id_char, value_char, n)
                if pos + group.size > end:
                    raise MalformedPayload("AVL IO group runs past the end of the packet")
                it = iter(group.unpack_from(data, pos))
                io.update(zip(it, it))
                pos += group.size
        if codec == CODEC_8E:
            pos = _variable_group(data, pos, end, io)
        fix_time = _EPOCH + timedelta(milliseconds=ms) if ms <= _MAX_MS else None
        lat = lat_raw / 1e7
        lng = lng_raw / 1e7
        get = io.get
        ign = get(239)
        mov = get(240)
        ext = get(66)
        bat = get(67)
        records.append(
            Position(
                fix_time=fix_time,
                lat=lat,
                lng=lng,
                speed_kmh=float(speed),
                course=angle,
                satellites=sats,
                valid=sats > 0 and fix_time is not None and (lat_raw != 0 or lng_raw != 0),
                altitude=altitude,
                io=io,
                ignition=None if ign is None else ign == 1,
                movement=None if mov is None else mov == 1,
                external_voltage=None if ext is None else ext / 1000.0,  # type: ignore[operator]
                battery_voltage=None if bat is None else bat / 1000.0,  # type: ignore[operator]
                gsm_signal=get(21),  # type: ignore[arg-type]
                odometer=get(16),  # type: ignore[arg-type]
                gnss_status=get(69),  # type: ignore[arg-type]
                priority=priority,
                event_io_id=head[0],
                generation_type=head[1] if codec == CODEC_16 else None,
            )
        )
    return records, pos


def _variable_group(data: bytes, pos: int, end: int, io: dict[int, IoValue]) -> int:
    """Codec 8E NX group: count u16, then id u16, length u16, value; values kept as hex."""
    if pos + 2 > end:
        raise MalformedPayload("AVL NX count runs past the end of the packet")
    n = _U16.unpack_from(data, pos)[0]
    pos += 2
    for _ in range(n):
        if pos + 4 > end:
            raise MalformedPayload("AVL NX element header runs past the end of the packet")
        io_id, length = struct.unpack_from(">HH", data, pos)
        pos += 4
        if pos + length > end:
            raise MalformedPayload("AVL NX value runs past the end of the packet")
        io[io_id] = data[pos : pos + length].hex()
        pos += length
    return pos
