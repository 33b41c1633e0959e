"""Decode one captured input completely: the engine of ``fleetgate decode`` and of the fixture tests.

:func:`decode_capture` runs the right decoder over a whole capture (one or
more frames), then reports what a server would do with it: the events, the
reply bytes it would send once the data is stored, and the error, if any,
that stopped decoding. Events decoded before an error are kept.
"""

from __future__ import annotations

import struct
from datetime import datetime
from typing import Any, Literal

import msgspec

from . import gt06, teltonika, teltonika_udp
from .errors import CodecError, NoFrame
from .events import Alarm, AvlPacket, Event, Location, Position

Protocol = Literal["gt06", "teltonika", "teltonika-udp"]
PROTOCOLS: tuple[Protocol, ...] = ("gt06", "teltonika", "teltonika-udp")


class Capture(msgspec.Struct, kw_only=True):
    """The outcome of decoding one capture; field order is the JSON order of ``fleetgate decode --json``."""

    protocol: Protocol
    ok: bool
    error: str | None
    crc_ok: bool | None
    reply_hex: str | None
    events: list[dict[str, Any]]


def detect(data: bytes) -> Protocol:
    """Guess the protocol of a capture from its first bytes (docs/device-protocols.md 1.1, 2.1, 3)."""
    if data[:2] in (gt06.SHORT, gt06.LONG):
        return "gt06"
    if data[:1] == b"\xff" or len(data) < 2:
        return "teltonika"
    first = struct.unpack_from(">H", data)[0]
    if first <= teltonika.MAX_IMEI_LENGTH:
        return "teltonika"
    if len(data) >= 8 and data[4] == 0x01 and 0 < struct.unpack_from(">H", data, 6)[0] <= 20:
        return "teltonika-udp"
    return "gt06"


def decode_capture(
    data: bytes,
    *,
    protocol: Protocol | Literal["auto"] = "auto",
    now: datetime,
    crc_policy: Literal["reject", "count"] = "reject",
) -> Capture:
    """Decode ``data`` as ``protocol``; ``now`` is the server clock for time replies."""
    proto: Protocol = detect(data) if protocol == "auto" else protocol
    events: list[Event] = []
    replies: list[bytes] = []
    error: CodecError | None = None
    crc_checked = proto != "teltonika-udp"
    crc_mismatches = 0
    try:
        if proto == "teltonika-udp":
            for datagram in teltonika_udp.split_datagrams(data):
                event = teltonika_udp.decode_datagram(datagram)
                events.append(event)
                if isinstance(event, AvlPacket):
                    replies.append(teltonika_udp.ack_for(event))
        else:
            decoder = _stream_decoder(proto, crc_policy)
            try:
                decoder.receive_data(data)
                decoder.receive_eof()
            finally:
                # What was decoded before an error is stored and acknowledged before the close.
                events.extend(decoder.events())
                crc_mismatches = decoder.crc_mismatches
                crc_checked = decoder.frames > 0
                for event in events:
                    reply = gt06.reply_for(event, now) if proto == "gt06" else teltonika.reply_for(event)
                    if reply is not None:
                        replies.append(reply)
            if not events and isinstance(decoder, gt06.Gt06Decoder) and decoder.discarded_bytes:
                raise NoFrame(f"{decoder.discarded_bytes} bytes without a frame")
    except CodecError as exc:
        error = exc
    crc_ok: bool | None = None
    if error is not None and error.reason == "bad_crc":
        crc_ok = False
    elif crc_checked:
        crc_ok = crc_mismatches == 0
    return Capture(
        protocol=proto,
        ok=error is None,
        error=None if error is None else error.reason,
        crc_ok=crc_ok,
        reply_hex=b"".join(replies).hex() if replies else None,
        events=[item for event in events for item in flatten(event)],
    )


def _stream_decoder(
    proto: Protocol, crc_policy: Literal["reject", "count"]
) -> gt06.Gt06Decoder | teltonika.TeltonikaDecoder:
    if proto == "gt06":
        return gt06.Gt06Decoder(crc_policy=crc_policy)
    return teltonika.TeltonikaDecoder(crc_policy=crc_policy)


_REQUIRED = ("fix_time", "lat", "lng", "speed_kmh", "course", "altitude", "satellites", "valid", "io")


def position_dict(position: Position, **context: Any) -> dict[str, Any]:
    """A position as a ``"type": "position"`` event: the required keys always, others when set."""
    raw = msgspec.to_builtins(position, str_keys=True)
    out: dict[str, Any] = {"type": "position"}
    out.update(context)
    for key in _REQUIRED:
        out[key] = raw.pop(key, None if key != "io" else {})
    out.update(raw)
    return out


def flatten(event: Event) -> list[dict[str, Any]]:
    """Events as the JSON objects of ``fleetgate decode``: one object per position, in wire order."""
    if isinstance(event, AvlPacket):
        context = {
            k: v
            for k, v in (
                ("codec", event.codec),
                ("packet_id", event.packet_id),
                ("avl_packet_id", event.avl_packet_id),
                ("imei", event.imei),
            )
            if v is not None
        }
        if not event.crc_ok:
            context["crc_ok"] = False
        return [position_dict(p, record=i, **context) for i, p in enumerate(event.positions)]
    raw = msgspec.to_builtins(event, str_keys=True)
    if isinstance(event, (Location, Alarm)) and event.position is not None:
        position = raw.pop("position")
        context = {k: v for k, v in raw.items() if k in ("msg_type", "serial", "cell", "crc_ok")}
        located = position_dict(event.position, **context)
        del position
        return [located] if isinstance(event, Location) else [located, raw]
    return [raw]
