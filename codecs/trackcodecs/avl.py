"""Teltonika AVL records, shared by the TCP packets and the UDP datagrams (docs/device-protocols.md 2.3, 2.4).

Speed matters here: a busy gateway decodes hundreds of thousands of records
a second. A device sends records of the same IO layout over and over, so the
first record of a layout is walked group by group, and the layout (the four
or five IO counts) is then compiled into one ``struct`` format covering the
whole record. Later records are read with a single ``unpack_from`` and
accepted only if the counts it read back equal the layout's: since each
count sits right after the previous group, equal counts prove the layout.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from .errors import MalformedPayload
from .events import IoValue, Position

CODEC_8 = 0x08
CODEC_8E = 0x8E
CODEC_16 = 0x10
AVL_CODECS = frozenset({CODEC_8, CODEC_8E, CODEC_16})

# timestamp u64 ms, priority, longitude i32, latitude i32, altitude i16, angle, satellites, speed
_HEADER_FORMAT = "QBiihHBH"
_HEADER = struct.Struct(">" + _HEADER_FORMAT)
_U16 = struct.Struct(">H")
_NX_ITEM = struct.Struct(">HH")
_MS_2000 = 946_684_800_000
_MS_MAX = 253_402_300_799_000  # 9999-12-31T23:59:59Z
_LAT_MAX = 900_000_000
_LNG_MAX = 1_800_000_000

# Per codec (2.4): format of the IO head (event id, [generation type], N total), of each
# count, and of each IO id.
#   codec 8:  event id u8,  N total u8,                 counts u8,  ids u8
#   codec 8E: event id u16, N total u16,                counts u16, ids u16, then the NX group
#   codec 16: event id u16, generation type u8, N u8,   counts u8,  ids u16
_IO_HEAD = {CODEC_8: "BB", CODEC_8E: "HH", CODEC_16: "HBB"}
_COUNT = {CODEC_8: "B", CODEC_8E: "H", CODEC_16: "B"}
_ID = {CODEC_8: "B", CODEC_8E: "H", CODEC_16: "H"}
_VALUE_CHARS = ("B", "H", "I", "Q")


class _Layout:
    """One record shape of one codec, compiled into two structs over the same bytes.

    ``head`` reads the record header, the IO head and the counts (IO pairs
    skipped as padding); ``pairs`` reads the IO id/value pairs contiguously
    (counts skipped), so they zip straight into a dict.
    """

    __slots__ = ("count_start", "expected", "head", "pairs", "pairs_offset", "size")

    def __init__(self, codec: int, expected: tuple[int, ...]) -> None:
        count_char, id_char = _COUNT[codec], _ID[codec]
        count_size = struct.calcsize(">" + count_char)
        head = _HEADER_FORMAT + _IO_HEAD[codec]
        pairs = ""
        for i, (value_char, n) in enumerate(zip(_VALUE_CHARS, expected, strict=True)):
            pair = id_char + value_char
            head += f"{count_char}{struct.calcsize('>' + pair) * n}x"
            pairs += (f"{count_size}x" if i else "") + pair * n
        if codec == CODEC_8E:  # the NX count, always 0 in a compiled layout
            head += "H"
            expected += (0,)
        self.head = struct.Struct(">" + head)
        self.pairs = struct.Struct(">" + pairs)
        self.pairs_offset = struct.calcsize(">" + _HEADER_FORMAT + _IO_HEAD[codec] + count_char)
        self.size = self.head.size
        self.count_start = 8 + len(_IO_HEAD[codec])
        self.expected = expected


_layouts: dict[tuple[int, tuple[int, ...]], _Layout] = {}
_last: dict[int, _Layout] = {}


def _remember(codec: int, counts: tuple[int, ...]) -> None:
    key = (codec, counts)
    layout = _layouts.get(key)
    if layout is None:
        if len(_layouts) > 1024:  # devices with ever-changing layouts: stay bounded
            _layouts.clear()
        layout = _layouts[key] = _Layout(codec, counts)
    _last[codec] = layout


def decode_records(codec: int, data: bytes, pos: int, end: int, count: int) -> tuple[list[Position], int]:
    """Decode ``count`` records of ``codec`` from ``data[pos:end]``; return them and the next offset."""
    records: list[Position] = []
    append = records.append
    is_16 = codec == CODEC_16
    layout = _last.get(codec)
    for _ in range(count):
        if layout is not None and pos + layout.size <= end:
            v = layout.head.unpack_from(data, pos)
            if v[layout.count_start :] == layout.expected:
                it = iter(layout.pairs.unpack_from(data, pos + layout.pairs_offset))
                append(_position(v, dict(zip(it, it)), v[9] if is_16 else None))  # noqa: B905 (strict= costs 0.2 us)
                pos += layout.size
                continue
        position, pos = _walk_record(codec, data, pos, end)
        append(position)
        layout = _last.get(codec)
    return records, pos


def _walk_record(codec: int, data: bytes, pos: int, end: int) -> tuple[Position, int]:
    """Read one record group by group (first record of a layout, or one with NX elements)."""
    head_struct = struct.Struct(">" + _IO_HEAD[codec])
    count_struct = struct.Struct(">" + _COUNT[codec])
    id_char = _ID[codec]
    if pos + _HEADER.size + head_struct.size > end:
        raise MalformedPayload("AVL record header runs past the end of the packet")
    header = _HEADER.unpack_from(data, pos) + head_struct.unpack_from(data, pos + _HEADER.size)
    pos += _HEADER.size + head_struct.size
    io: dict[int, IoValue] = {}
    counts = []
    for value_char in _VALUE_CHARS:
        if pos + count_struct.size > end:
            raise MalformedPayload("AVL IO count runs past the end of the packet")
        n = count_struct.unpack_from(data, pos)[0]
        pos += count_struct.size
        counts.append(n)
        group = struct.Struct(">" + (id_char + value_char) * n)
        if pos + group.size > end:
            raise MalformedPayload("AVL IO group runs past the end of the packet")
        it = iter(group.unpack_from(data, pos))
        io.update(zip(it, it, strict=False))
        pos += group.size
    nx = 0
    if codec == CODEC_8E:
        nx, pos = _variable_group(data, pos, end, io)
    if not nx:
        _remember(codec, tuple(counts))
    return _position(header, io, header[9] if codec == CODEC_16 else None), pos


def _variable_group(data: bytes, pos: int, end: int, io: dict[int, IoValue]) -> tuple[int, int]:
    """Codec 8E NX group: count u16, then id u16, length u16, value; values kept as hex."""
    if pos + 2 > end:
        raise MalformedPayload("AVL NX count runs past the end of the packet")
    n = _U16.unpack_from(data, pos)[0]
    pos += 2
    for _ in range(n):
        if pos + 4 > end:
            raise MalformedPayload("AVL NX element header runs past the end of the packet")
        io_id, length = _NX_ITEM.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            raise MalformedPayload("AVL NX value runs past the end of the packet")
        io[io_id] = data[pos : pos + length].hex()
        pos += length
    return n, pos


def _position(v: tuple[Any, ...], io: dict[int, IoValue], generation_type: int | None) -> Position:
    """Build a Position from header fields ``v[0:9]`` (v[8] = event IO id) and the IO map."""
    ms, priority, lng_raw, lat_raw, altitude, angle, sats, speed, event_id = v[:9]
    get = io.get
    ign = get(239)
    mov = get(240)
    ext = get(66)
    bat = get(67)
    # Positional on purpose (see Position): fix_time, lat, lng, speed_kmh, course, satellites,
    # valid, altitude, io, ignition, movement, external_voltage, battery_voltage, gsm_signal,
    # odometer, gnss_status, priority, event_io_id, generation_type.
    return Position(
        datetime.fromtimestamp(ms / 1000, UTC) if 0 <= ms <= _MS_MAX else None,
        lat_raw / 1e7,
        lng_raw / 1e7,
        float(speed),
        angle,
        sats,
        # valid: a fix (satellites), a date after 2000, not 0/0, coordinates and angle in range
        (
            sats > 0
            and _MS_2000 <= ms <= _MS_MAX
            and (lat_raw != 0 or lng_raw != 0)
            and -_LAT_MAX <= lat_raw <= _LAT_MAX
            and -_LNG_MAX <= lng_raw <= _LNG_MAX
            and angle <= 360
        ),
        altitude,
        io,
        None if ign is None else ign == 1,
        None if mov is None else mov == 1,
        ext / 1000.0 if type(ext) is int else None,
        bat / 1000.0 if type(bat) is int else None,
        get(21),  # type: ignore[arg-type]
        get(16),  # type: ignore[arg-type]
        get(69),  # type: ignore[arg-type]
        priority,
        event_id,
        generation_type,
    )
