"""trackcodecs: pure (sans-I/O) decoders and encoders for GPS-tracker protocols.

* :mod:`trackcodecs.gt06` - GT06 / Concox over TCP
* :mod:`trackcodecs.teltonika` - Teltonika over TCP (codec 8, 8E, 16, 12-15)
* :mod:`trackcodecs.teltonika_udp` - Teltonika over UDP

Nothing here does I/O, reads a clock or logs: bytes in, events out, and
reply bytes from pure functions. Errors are :class:`CodecError` subclasses
with a stable ``reason`` slug.
"""

from .errors import CodecError
from .events import (
    Alarm,
    AnyEvent,
    AvlPacket,
    CellTower,
    Command,
    CommandResponse,
    Event,
    Heartbeat,
    ImeiPacket,
    Information,
    Keepalive,
    Lbs,
    Location,
    Login,
    Position,
    TerminalStatus,
    TimeRequest,
    Unsupported,
)
from .gt06 import Gt06Decoder
from .teltonika import TeltonikaDecoder
from .teltonika_udp import decode_datagram

__all__ = [
    "Alarm",
    "AnyEvent",
    "AvlPacket",
    "CellTower",
    "CodecError",
    "Command",
    "CommandResponse",
    "Event",
    "Gt06Decoder",
    "Heartbeat",
    "ImeiPacket",
    "Information",
    "Keepalive",
    "Lbs",
    "Location",
    "Login",
    "Position",
    "TeltonikaDecoder",
    "TerminalStatus",
    "TimeRequest",
    "Unsupported",
    "decode_datagram",
]
