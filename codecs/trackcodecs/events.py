"""What the codecs produce: positions and one event per decoded frame.

All types are frozen msgspec Structs. Events form a tagged union on the
``type`` field, so the same objects encode to JSON for the ``decode`` command
and to msgpack for the bus without a translation layer.

An event stands for one frame (one GT06 packet, one Teltonika packet or
datagram). A frame carrying several positions, such as a Teltonika AVL
packet, is one event holding them in wire order; the reply for it is built by
the protocol module's ``reply_for``/``ack_for`` once the positions are stored.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

IoValue = int | str
"""An IO element value: an integer, or a hex string for variable-length (NX) values."""


class Position(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One GNSS fix as the device reported it, in SI-ish units.

    Not ``kw_only`` on purpose: the decoders' hot paths build it with
    positional arguments, about eight times faster than keywords in msgspec
    for a struct this wide. Add fields only at the end.

    ``fix_time`` is UTC (None when the device sent no calendar date);
    ``valid`` is the device's own fix flag combined with basic sanity (a
    calendar date, not 0/0). Well-known IO values are lifted into named
    fields; the raw ``io`` map keeps everything the device sent.
    """

    fix_time: datetime | None
    lat: float
    lng: float
    speed_kmh: float
    course: int
    satellites: int
    valid: bool
    altitude: int | None = None
    io: dict[int, IoValue] = {}
    ignition: bool | None = None
    movement: bool | None = None
    external_voltage: float | None = None
    battery_voltage: float | None = None
    gsm_signal: int | None = None
    odometer: int | None = None
    gnss_status: int | None = None
    priority: int | None = None
    event_io_id: int | None = None
    generation_type: int | None = None
    realtime: bool | None = None
    historical: bool | None = None


class CellTower(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The serving GSM/LTE cell a GT06 device reported beside (or instead of) a fix."""

    mcc: int
    mnc: int
    lac: int
    cell_id: int


class TerminalStatus(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True):
    """GT06 terminal information byte plus the voltage/GSM/alarm/language bytes (docs/device-protocols.md 1.8)."""

    fuel_cut: bool
    gps_tracking: bool
    alarm_bits: int
    charging: bool
    acc: bool
    armed: bool
    voltage_level: int | None = None
    external_voltage: float | None = None
    gsm_signal: int | None = None
    alarm_code: int | None = None
    language: int | None = None


class Event(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True, tag_field="type"):
    """Base of all events; never instantiated itself."""


class Login(Event, tag="login", frozen=True):
    """GT06 login (0x01): binds the connection to an IMEI."""

    msg_type: int
    imei: str
    serial: int
    model_code: int | None = None
    tz_offset_min: int | None = None
    crc_ok: bool = True


class ImeiPacket(Event, tag="imei", frozen=True):
    """Teltonika TCP handshake: the IMEI as ASCII digits."""

    imei: str
    imei_valid: bool


class Keepalive(Event, tag="ping", frozen=True):
    """Teltonika single 0xFF keep-alive byte."""


class Location(Event, tag="location", frozen=True):
    """GT06 GPS-bearing report (0x10, 0x11, 0x12, 0x1A, 0x1E, 0x22, 0x37, 0xA0)."""

    msg_type: int
    serial: int
    position: Position
    cell: CellTower | None = None
    crc_ok: bool = True


class Heartbeat(Event, tag="heartbeat", frozen=True):
    """GT06 status / heartbeat (0x13, 0x23)."""

    msg_type: int
    serial: int
    status: TerminalStatus
    crc_ok: bool = True


class Alarm(Event, tag="alarm", frozen=True):
    """GT06 alarm (0x16, 0x26, 0x27, 0xA4 with GPS; 0x19 LBS only)."""

    msg_type: int
    serial: int
    alarm_code: int
    alarm: str
    status: TerminalStatus
    position: Position | None = None
    cell: CellTower | None = None
    fence: int | None = None
    crc_ok: bool = True


class Lbs(Event, tag="lbs", frozen=True):
    """GT06 cell-only report (0x18, 0x24, 0x28, 0x2E, 0xA1)."""

    msg_type: int
    serial: int
    cell: CellTower | None
    fix_time: datetime | None = None
    crc_ok: bool = True


class TimeRequest(Event, tag="time_request", frozen=True):
    """GT06 0x8A: the device asks for UTC time."""

    msg_type: int
    serial: int
    crc_ok: bool = True


class Information(Event, tag="information", frozen=True):
    """GT06 0x94 information transfer; known sub-types are decoded, the rest kept as hex."""

    msg_type: int
    serial: int
    subtype: int
    data_hex: str
    external_voltage: float | None = None
    text: str | None = None
    imei: str | None = None
    imsi: str | None = None
    iccid: str | None = None
    crc_ok: bool = True


class Command(Event, tag="command", frozen=True):
    """A server-to-device command (GT06 0x80, Teltonika codec 12/14 type 0x05)."""

    protocol: str
    text: str
    codec: int | None = None
    serial: int | None = None
    server_flag: int | None = None
    imei: str | None = None


class CommandResponse(Event, tag="command_response", frozen=True):
    """A device's reply to a command (GT06 0x15/0x21, Teltonika codec 12/13/14/15)."""

    protocol: str
    text: str
    payload_hex: str
    codec: int | None = None
    message_type: int | None = None
    serial: int | None = None
    server_flag: int | None = None
    imei: str | None = None
    timestamp: datetime | None = None
    crc_ok: bool = True


class AvlPacket(Event, tag="avl", frozen=True):
    """A Teltonika AVL packet (TCP) or datagram (UDP: ``packet_id``, ``avl_packet_id``, ``imei`` set)."""

    codec: int
    positions: tuple[Position, ...]
    packet_id: int | None = None
    avl_packet_id: int | None = None
    imei: str | None = None
    crc_ok: bool = True


class Unsupported(Event, tag="unsupported", frozen=True):
    """A frame whose framing (and CRC) is fine but whose type we do not decode."""

    protocol: str
    msg_type: int
    payload_hex: str
    serial: int | None = None
    crc_ok: bool = True


AnyEvent = (
    Login
    | ImeiPacket
    | Keepalive
    | Location
    | Heartbeat
    | Alarm
    | Lbs
    | TimeRequest
    | Information
    | Command
    | CommandResponse
    | AvlPacket
    | Unsupported
)
