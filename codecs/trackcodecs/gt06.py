"""GT06 / Concox binary protocol over TCP (docs/device-protocols.md section 1).

Frames are ``78 78 | L(1) | type | content | serial(2) | crc(2) | 0D 0A`` or
the same with ``79 79`` and a 2-byte L. :class:`Gt06Decoder` splits a byte
stream into frames and decodes each into one event; :func:`reply_for`
builds the bytes the server must send back once the frame's data is stored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from msgspec.structs import replace

from .crc import crc16_x25
from .errors import CrcMismatch, FrameTooLarge, MalformedPayload
from .events import (
    Alarm,
    CellTower,
    Command,
    CommandResponse,
    Event,
    Heartbeat,
    Information,
    Lbs,
    Location,
    Login,
    Position,
    TerminalStatus,
    TimeRequest,
    Unsupported,
)
from .stream import StreamDecoder

CrcPolicy = Literal["reject", "count"]

SHORT = b"\x78\x78"
LONG = b"\x79\x79"
STOP = b"\x0d\x0a"
DEFAULT_MAX_FRAME = 32 * 1024
_MIN_L = 5  # type + serial + crc (1.1)
_MARKER_BYTES = (0x78, 0x79)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# 1.6 GPS block: date-time (6 x u8), gps info, lat u32, lng u32, speed u8, course/status u16
_GPS = struct.Struct(">6BBIIBH")
_CELL = struct.Struct(">HBHBH")  # MCC, MNC, LAC, cell id high byte, cell id low 16 bits
_LAT_MAX = 90 * 1_800_000
_LNG_MAX = 180 * 1_800_000

# Terminal information byte, 1.8.
_ALARM_NAMES = {
    0x00: "normal",
    0x01: "sos",
    0x02: "power_cut",
    0x03: "vibration",
    0x04: "geofence_enter",
    0x05: "geofence_exit",
    0x06: "overspeed",
    0x09: "movement",
    0x0A: "gps_blind_enter",
    0x0B: "gps_blind_exit",
    0x0C: "power_on",
    0x0D: "gps_first_fix",
    0x0E: "low_external_battery",
    0x0F: "low_external_battery_protection",
    0x10: "sim_change",
    0x11: "power_off",
    0x12: "airplane_mode",
    0x13: "tamper",
    0x14: "door",
    0x15: "low_power_shutdown",
    0x16: "sound",
    0x17: "fake_base_station",
    0x18: "cover_open",
    0x19: "low_internal_battery",
    0x20: "sleep",
    0x23: "fall",
    0x24: "charger_inserted",
    0x29: "harsh_acceleration",
    0x2A: "sharp_left",
    0x2B: "sharp_right",
    0x2C: "collision",
    0x2D: "rollover",
    0x30: "harsh_braking",
    0x32: "pull",
    0x3C: "car_theft",
    0x3D: "illegal_start",
    0x3E: "button",
    0xFE: "acc_on",
    0xFF: "acc_off",
}

# Types the device expects to be acknowledged with 78 78 05 <type> <serial> (1.10).
ACKED_TYPES = frozenset({0x01, 0x13, 0x16, 0x19, 0x23, 0x26, 0x27, 0xA4})
# Types whose date-time is UTC by specification; the others carry device time (1.11).
_UTC_TYPES = frozenset({0x22, 0x26, 0x27, 0x28, 0xA0, 0xA4})


def alarm_name(code: int) -> str:
    """The slug for a GT06 alarm code, ``unknown_0xNN`` when not in the vendor table."""
    return _ALARM_NAMES.get(code, f"unknown_0x{code:02x}")


class _Frame:
    """One framed packet: its content is ``buf[start:end]``; the serial follows it."""

    __slots__ = ("buf", "crc_ok", "end", "msg_type", "offset", "serial", "size", "start")

    def __init__(
        self,
        buf: bytes,
        start: int,
        end: int,
        msg_type: int,
        serial: int,
        crc_ok: bool,
        offset: timedelta | None,
    ) -> None:
        self.buf = buf
        self.start = start
        self.end = end
        self.size = end - start
        self.msg_type = msg_type
        self.serial = serial
        self.crc_ok = crc_ok
        self.offset = offset  # device-time offset from UTC, when known

    def need(self, n: int) -> None:
        if self.size < n:
            raise MalformedPayload(f"type 0x{self.msg_type:02x}: {self.size} content bytes, need {n}")


class Gt06Decoder(StreamDecoder):
    """Sans-I/O GT06 stream decoder for one TCP connection.

    Feed bytes with :meth:`receive_data`, collect events with :meth:`events`.
    Bytes before a start marker are skipped (counted in ``discarded_bytes``);
    a frame whose end is not ``0D 0A`` is treated as a false start and the
    scan resumes one byte later. (A false start whose declared length runs
    past the bytes received so far can only be recognised once that many
    bytes are in: the frames behind it wait, they are not lost.) A declared length over ``max_frame`` raises
    :class:`FrameTooLarge` before anything is buffered. With ``crc_policy``
    ``"count"`` a CRC mismatch is decoded, flagged ``crc_ok=False`` and
    counted in ``crc_mismatches``; with ``"reject"`` it raises.

    ``local_offset_min`` is the configured device-time offset for the types
    that carry device time; without it the login's time-zone field is used,
    and without that the time is taken as UTC.
    """

    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        crc_policy: CrcPolicy = "reject",
        local_offset_min: int | None = None,
    ) -> None:
        super().__init__()
        self.max_frame = max_frame
        self.crc_policy = crc_policy
        self.discarded_bytes = 0
        self._configured_offset = local_offset_min
        self._offset = None if local_offset_min is None else timedelta(minutes=local_offset_min)

    def _drain(self, data: bytes) -> tuple[int, int]:
        pos = 0
        n = len(data)
        append = self._events.append
        while True:
            if n - pos < 2:
                if n - pos == 1 and data[pos] not in _MARKER_BYTES:
                    pos = self._skip(data, pos, n)
                return pos, 2
            marker = data[pos : pos + 2]
            if marker == SHORT:
                if n - pos < 3:
                    return pos, 3
                length, head = data[pos + 2], 3
            elif marker == LONG:
                if n - pos < 4:
                    return pos, 4
                length, head = _U16.unpack_from(data, pos + 2)[0], 4
            else:
                pos = self._resync(data, pos + 1)
                continue
            if length < _MIN_L:
                # Cannot hold type + serial + CRC (1.1): a marker inside garbage, or a vendor
                # report without CRC (1.12). Skip it like any false start.
                pos = self._resync(data, pos + 1)
                continue
            total = head + length + 2
            if total > self.max_frame:
                raise FrameTooLarge(f"declared frame size {total} > {self.max_frame}")
            if n - pos < total:
                return pos, total
            if data[pos + total - 2 : pos + total] != STOP:
                # A start marker inside garbage: skip it and look for the next one.
                pos = self._resync(data, pos + 1)
                continue
            append(self._decode_frame(data, pos, total, head))
            pos += total

    def _resync(self, data: bytes, start: int) -> int:
        """Skip to the next start marker at or after ``start``, counting the skipped bytes."""
        hits = [i for i in (data.find(SHORT, start), data.find(LONG, start)) if i >= 0]
        nxt = min(hits) if hits else max(len(data) - 1 if data[-1] in _MARKER_BYTES else len(data), start)
        self.discarded_bytes += nxt - (start - 1)
        return nxt

    def _skip(self, data: bytes, pos: int, n: int) -> int:
        self.discarded_bytes += n - pos
        return n

    def _decode_frame(self, data: bytes, pos: int, total: int, head: int) -> Event:
        end = pos + total
        crc_ok = crc16_x25(data[pos + 2 : end - 4]) == _U16.unpack_from(data, end - 4)[0]
        msg_type = data[pos + head]
        if not crc_ok:
            if self.crc_policy == "reject":
                raise CrcMismatch(f"GT06 CRC mismatch in type 0x{msg_type:02x} frame")
            self.crc_mismatches += 1
        self.frames += 1
        serial = _U16.unpack_from(data, end - 6)[0]
        offset = None if msg_type in _UTC_TYPES else self._offset
        f = _Frame(data, pos + head + 1, end - 6, msg_type, serial, crc_ok, offset)
        decoder = _DECODERS.get(msg_type)
        if decoder is None:
            content = data[f.start : f.end].hex()
            return Unsupported(protocol="gt06", msg_type=msg_type, payload_hex=content, serial=serial, crc_ok=crc_ok)
        event = decoder(f)
        if isinstance(event, Login) and self._configured_offset is None and event.tz_offset_min is not None:
            self._offset = timedelta(minutes=event.tz_offset_min)
        return event


# --------------------------------------------------------------------------
# Field decoders. Each takes a _Frame and returns one event; offsets follow
# the tables of docs/device-protocols.md section 1.


def _bcd_digits(raw: bytes) -> str:
    digits = raw.hex()
    if not digits.isdigit():
        raise MalformedPayload(f"BCD field {digits!r} holds non-decimal nibbles")
    return digits


def _gps(f: _Frame, at: int) -> tuple[Position, int]:
    """Decode the 18-byte GPS block (1.6) at content offset ``at``."""
    yy, mo, dd, hh, mi, ss, info, lat_raw, lng_raw, speed, cs = _GPS.unpack_from(f.buf, f.start + at)
    try:
        fix_time: datetime | None = datetime(2000 + yy, mo, dd, hh, mi, ss, tzinfo=UTC)
    except ValueError:
        fix_time = None
    if fix_time is not None and f.offset is not None:
        fix_time -= f.offset
    lat = lat_raw / 1_800_000.0 if cs & 0x0400 else lat_raw / -1_800_000.0
    lng = lng_raw / -1_800_000.0 if cs & 0x0800 else lng_raw / 1_800_000.0
    course = cs & 0x03FF
    # valid: the positioned bit, a calendar date, not 0/0, coordinates and course in range
    valid = (
        cs & 0x1000 != 0
        and fix_time is not None
        and (lat_raw != 0 or lng_raw != 0)
        and lat_raw <= _LAT_MAX
        and lng_raw <= _LNG_MAX
        and course <= 360
    )
    # Positional on purpose (see Position): fix_time, lat, lng, speed_kmh, course, satellites,
    # valid, altitude, io, ignition (ACC bit 15 when bit 14 says it is valid), 10 x None, realtime.
    position = Position(
        fix_time,
        lat,
        lng,
        float(speed),
        course,
        info & 0x0F,
        valid,
        None,
        {},
        bool(cs & 0x8000) if cs & 0x4000 else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        not cs & 0x2000,
    )
    return position, at + 18


def _cell(
    f: _Frame, at: int, lac_size: int = 2, ci_size: int = 3, wide_mnc: bool = False
) -> tuple[CellTower | None, int]:
    """Decode MCC/MNC/LAC/cell id (1.7); MCC bit 15 (or ``wide_mnc``) means a 2-byte MNC. None when it does not fit."""
    b = f.buf
    p = f.start + at
    if lac_size == 2 and ci_size == 3 and not wide_mnc and f.size >= at + 8 and not b[p] & 0x80:
        mcc, mnc, lac, ci_hi, ci_lo = _CELL.unpack_from(b, p)  # the common 2G layout, in one call
        return CellTower(mcc=mcc, mnc=mnc, lac=lac, cell_id=ci_hi << 16 | ci_lo), at + 8
    if f.size < at + 3 + lac_size + ci_size:
        return None, f.size
    mcc = _U16.unpack_from(b, p)[0]
    p += 2
    if mcc & 0x8000 or wide_mnc:
        mcc &= 0x7FFF
        mnc = _U16.unpack_from(b, p)[0]
        p += 2
    else:
        mnc = b[p]
        p += 1
    if f.end < p + lac_size + ci_size:
        return None, f.size
    lac = int.from_bytes(b[p : p + lac_size], "big")
    p += lac_size
    cell_id = int.from_bytes(b[p : p + ci_size], "big")
    p += ci_size
    return CellTower(mcc=mcc, mnc=mnc, lac=lac, cell_id=cell_id), p - f.start


def _status(f: _Frame, at: int, *, external_voltage: bool = False) -> TerminalStatus:
    """Terminal info + voltage + GSM + alarm + language (1.8); shorter variants leave fields None."""
    b, p, end = f.buf, f.start + at, f.end
    f.need(at + 1)
    info = b[p]
    voltage_level = ext = None
    p += 1
    if external_voltage:
        if p + 2 <= end:
            ext = _U16.unpack_from(b, p)[0] / 100.0
        p += 2
    else:
        voltage_level = b[p] if p < end else None
        p += 1
    gsm = b[p] if p < end else None
    alarm_code = b[p + 1] if p + 1 < end else None
    language = b[p + 2] if p + 2 < end else None
    return TerminalStatus(
        fuel_cut=bool(info & 0x80),
        gps_tracking=bool(info & 0x40),
        alarm_bits=(info >> 3) & 0x07,
        charging=bool(info & 0x04),
        acc=bool(info & 0x02),
        armed=bool(info & 0x01),
        voltage_level=voltage_level,
        external_voltage=ext,
        gsm_signal=gsm,
        alarm_code=alarm_code,
        language=language,
    )


def _login(f: _Frame) -> Event:
    f.need(8)
    b, s = f.buf, f.start
    imei = _bcd_digits(b[s : s + 8])[1:]
    model = tz = None
    if f.size >= 12:
        model = _U16.unpack_from(b, s + 8)[0]
        raw = _U16.unpack_from(b, s + 10)[0]
        hhmm = raw >> 4
        tz = (hhmm // 100) * 60 + hhmm % 100
        if raw & 0x08:
            tz = -tz
    elif f.size >= 10:
        model = _U16.unpack_from(b, s + 8)[0]
    return Login(msg_type=f.msg_type, imei=imei, serial=f.serial, model_code=model, tz_offset_min=tz, crc_ok=f.crc_ok)


def _location(prefix: int = 0, ci_size: int = 3, wide_mnc: bool = False) -> Callable[[_Frame], Event]:
    """GPS block after ``prefix`` bytes, then an optional cell block (0x10/0x11/0x12/0x1A/0x1E/0x37)."""

    def decode(f: _Frame) -> Event:
        f.need(prefix + 18)
        position, at = _gps(f, prefix)
        cell, _ = _cell(f, at, ci_size=ci_size, wide_mnc=wide_mnc)
        return Location(msg_type=f.msg_type, serial=f.serial, position=position, cell=cell, crc_ok=f.crc_ok)

    return decode


def _location_utc(lac_size: int = 2, ci_size: int = 3) -> Callable[[_Frame], Event]:
    """0x22 / 0xA0: GPS + cell + ACC, upload mode, re-upload flag, optional mileage (1.7)."""

    def decode(f: _Frame) -> Event:
        f.need(18)
        position, at = _gps(f, 0)
        cell, at = _cell(f, at, lac_size, ci_size)
        b, p = f.buf, f.start + at
        if cell is not None and f.size >= at + 3:
            odometer = _U32.unpack_from(b, p + 3)[0] if f.size >= at + 7 else None
            position = replace(position, ignition=bool(b[p]), historical=bool(b[p + 2]), odometer=odometer)
        return Location(msg_type=f.msg_type, serial=f.serial, position=position, cell=cell, crc_ok=f.crc_ok)

    return decode


def _alarm(lac_size: int = 2, ci_size: int = 3) -> Callable[[_Frame], Event]:
    """0x16 / 0x26 / 0x27 / 0xA4: GPS, LBS length + cell, status block, [fence] (1.9)."""

    def decode(f: _Frame) -> Event:
        f.need(18 + 1 + 5)
        position, at = _gps(f, 0)
        lbs_len = f.buf[f.start + at]
        cell = None
        if lbs_len > 1:
            cell, _ = _cell(f, at + 1, lac_size, ci_size)
            at += lbs_len
        else:
            at += 1
        f.need(at + 5)
        status = _status(f, at)
        fence = f.buf[f.start + at + 5] if f.msg_type == 0x27 and f.size > at + 5 else None
        position = replace(position, ignition=status.acc, gsm_signal=status.gsm_signal)
        return _alarm_event(f, status, position=position, cell=cell, fence=fence)

    return decode


def _alarm_event(
    f: _Frame, status: TerminalStatus, *, position: Position | None = None, cell: CellTower | None, fence: int | None
) -> Alarm:
    code = status.alarm_code or 0
    return Alarm(
        msg_type=f.msg_type,
        serial=f.serial,
        alarm_code=code,
        alarm=alarm_name(code),
        status=status,
        position=position,
        cell=cell,
        fence=fence,
        crc_ok=f.crc_ok,
    )


def _lbs_alarm(f: _Frame) -> Event:
    """0x19: cell block then status block, no GPS."""
    cell, at = _cell(f, 0)
    if cell is None:
        raise MalformedPayload("0x19 without a cell block")
    f.need(at + 5)
    return _alarm_event(f, _status(f, at), cell=cell, fence=None)


def _lbs(with_time: bool) -> Callable[[_Frame], Event]:
    """0x18 / 0x24 / 0x28 / 0x2E: [date-time] + serving cell (neighbour cells are not kept)."""

    def decode(f: _Frame) -> Event:
        at = 0
        fix_time = None
        if with_time:
            f.need(6)
            y, mo, d, h, mi, s = f.buf[f.start : f.start + 6]
            try:
                fix_time = datetime(2000 + y, mo, d, h, mi, s, tzinfo=UTC)
            except ValueError:
                fix_time = None
            at = 6
        cell, _ = _cell(f, at)
        return Lbs(msg_type=f.msg_type, serial=f.serial, cell=cell, fix_time=fix_time, crc_ok=f.crc_ok)

    return decode


def _heartbeat(external_voltage: bool) -> Callable[[_Frame], Event]:
    def decode(f: _Frame) -> Event:
        status = _status(f, 0, external_voltage=external_voltage)
        return Heartbeat(msg_type=f.msg_type, serial=f.serial, status=status, crc_ok=f.crc_ok)

    return decode


def _string_short(f: _Frame) -> Event:
    """0x15: command length (4 + text), server flag (4), ASCII, [language (2)]."""
    f.need(5)
    b, s = f.buf, f.start
    cmd_len = b[s]
    if cmd_len < 4 or 1 + cmd_len > f.size:
        raise MalformedPayload(f"0x15 command length {cmd_len} does not fit {f.size} content bytes")
    flag = _U32.unpack_from(b, s + 1)[0]
    raw = b[s + 5 : s + 1 + cmd_len]
    return CommandResponse(
        protocol="gt06",
        text=raw.decode("ascii", "replace"),
        payload_hex=raw.hex(),
        message_type=f.msg_type,
        serial=f.serial,
        server_flag=flag,
        crc_ok=f.crc_ok,
    )


def _string_long(f: _Frame) -> Event:
    """0x21: server flag (4), content code (1 = ASCII, 2 = UTF-16BE), content."""
    f.need(5)
    b, s = f.buf, f.start
    flag = _U32.unpack_from(b, s)[0]
    raw = b[s + 5 : f.end]
    text = raw.decode("utf-16-be", "replace") if b[s + 4] == 2 else raw.decode("ascii", "replace")
    return CommandResponse(
        protocol="gt06",
        text=text,
        payload_hex=raw.hex(),
        message_type=f.msg_type,
        serial=f.serial,
        server_flag=flag,
        crc_ok=f.crc_ok,
    )


def _command(f: _Frame) -> Event:
    """0x80 as sent by a server (decoded so ``fleetgate decode`` can show our own commands)."""
    f.need(5)
    b, s = f.buf, f.start
    cmd_len = b[s]
    if cmd_len < 4 or 1 + cmd_len > f.size:
        raise MalformedPayload(f"0x80 command length {cmd_len} does not fit {f.size} content bytes")
    text = b[s + 5 : s + 1 + cmd_len].decode("ascii", "replace")
    return Command(protocol="gt06", text=text, serial=f.serial, server_flag=_U32.unpack_from(b, s + 1)[0])


def _time_request(f: _Frame) -> Event:
    return TimeRequest(msg_type=f.msg_type, serial=f.serial, crc_ok=f.crc_ok)


def _information(f: _Frame) -> Event:
    """0x94: sub-type byte then content (1.4): 0x00 external voltage, 0x04 status text, 0x0A IMEI/IMSI/ICCID."""
    f.need(1)
    sub = f.buf[f.start]
    data = f.buf[f.start + 1 : f.end]
    voltage = _U16.unpack_from(data)[0] / 100.0 if sub == 0x00 and len(data) >= 2 else None
    text = data.decode("ascii", "replace") if sub == 0x04 else None
    ids = sub == 0x0A and len(data) >= 16
    return Information(
        msg_type=f.msg_type,
        serial=f.serial,
        subtype=sub,
        data_hex=data.hex(),
        external_voltage=voltage,
        text=text,
        imei=_bcd_digits(data[0:8])[1:] if ids else None,
        imsi=_bcd_digits(data[8:16])[1:] if ids else None,
        iccid=data[16:26].hex().rstrip("f") if ids and len(data) >= 26 else None,  # BCD, F-padded
        crc_ok=f.crc_ok,
    )


_DECODERS: dict[int, Callable[[_Frame], Event]] = {
    0x01: _login,
    0x10: _location(),
    0x11: _location(ci_size=4, wide_mnc=True),  # "LBS_6": 2-byte MNC, 4-byte cell id
    0x12: _location(),
    0x13: _heartbeat(external_voltage=False),
    0x15: _string_short,
    0x16: _alarm(),
    0x18: _lbs(with_time=True),
    0x19: _lbs_alarm,
    0x1A: _location(),
    0x1E: _location(),
    0x21: _string_long,
    0x22: _location_utc(),
    0x23: _heartbeat(external_voltage=True),
    0x24: _lbs(with_time=True),
    0x26: _alarm(),
    0x27: _alarm(),
    0x28: _lbs(with_time=True),
    0x2E: _lbs(with_time=True),
    0x34: _location(prefix=4),
    0x37: _location(),
    0x80: _command,
    0x8A: _time_request,
    0x94: _information,
    0xA0: _location_utc(lac_size=4, ci_size=8),
    0xA4: _alarm(lac_size=4, ci_size=8),
}


# --------------------------------------------------------------------------
# Encoders: replies and commands (1.10). Pure functions; time is an argument.


def build_frame(msg_type: int, content: bytes, serial: int) -> bytes:
    """Frame ``content`` as a GT06 packet: ``78 78`` when it fits one length byte, else ``79 79``."""
    length = 1 + len(content) + 2 + 2
    head = SHORT + bytes((length,)) if length <= 255 else LONG + _U16.pack(length)
    body = head + bytes((msg_type,)) + content + _U16.pack(serial & 0xFFFF)
    return body + _U16.pack(crc16_x25(body[2:])) + STOP


def ack(msg_type: int, serial: int) -> bytes:
    """The generic acknowledgement ``78 78 05 <type> <serial> <crc> 0D 0A``."""
    return build_frame(msg_type, b"", serial)


def time_reply(serial: int, now: datetime) -> bytes:
    """Answer to a 0x8A time request: UTC ``now`` as YY MM DD hh mm ss."""
    t = now.astimezone(UTC)
    return build_frame(0x8A, bytes((t.year - 2000, t.month, t.day, t.hour, t.minute, t.second)), serial)


def reply_for(event: Event, now: datetime) -> bytes | None:
    """The bytes the server must send for ``event`` once its data is stored, or None."""
    if isinstance(event, TimeRequest):
        return time_reply(event.serial, now)
    msg_type = getattr(event, "msg_type", None)
    if msg_type in ACKED_TYPES:
        return ack(msg_type, event.serial)  # type: ignore[attr-defined]
    return None


def encode_command(text: str, *, serial: int, server_flag: int = 0, language: int | None = None) -> bytes:
    """A 0x80 online command: length (4 + text), server flag, ASCII text, [language]."""
    raw = text.encode("ascii")
    if len(raw) > 0xFF - 4:
        raise ValueError("GT06 command text longer than 251 bytes")
    content = bytes((4 + len(raw),)) + _U32.pack(server_flag) + raw
    if language is not None:
        content += _U16.pack(language)
    return build_frame(0x80, content, serial)
