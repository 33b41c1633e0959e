"""Teltonika over UDP: one AVL packet per datagram, no CRC (docs/device-protocols.md section 3).

Datagram layout::

    length u16 | packet id u16 | 01 | AVL packet id u8 | IMEI length u16 | IMEI | codec | N1 | records | N2

The ACK echoes packet id and AVL packet id and carries the accepted record count.
"""

from __future__ import annotations

import struct

from .errors import BadImeiPacket, BadLength, FrameTooLarge, MalformedPayload, Truncated
from .events import AvlPacket, Event, Unsupported
from .teltonika import DEFAULT_MAX_FRAME, MAX_IMEI_LENGTH, decode_data_field, imei_event

_HEAD = struct.Struct(">HHBBH")  # length, packet id, not-usable byte, AVL packet id, IMEI length
_ACK = struct.Struct(">HHBBB")


def decode_datagram(data: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> Event:
    """Decode one datagram into an :class:`AvlPacket` (or :class:`Unsupported` for other codecs)."""
    if len(data) > max_frame:
        raise FrameTooLarge(f"datagram of {len(data)} bytes > {max_frame}")
    if len(data) < _HEAD.size:
        raise Truncated(f"datagram of {len(data)} bytes is shorter than its header")
    length, packet_id, _unused, avl_packet_id, imei_len = _HEAD.unpack_from(data)
    if length != len(data) - 2:
        raise BadLength(f"declared length {length} but {len(data) - 2} bytes follow it")
    if not 0 < imei_len <= MAX_IMEI_LENGTH:
        raise BadImeiPacket(f"IMEI length {imei_len}")
    start = _HEAD.size + imei_len
    if len(data) < start + 3:
        raise Truncated("datagram ends before codec, N1 and N2")
    imei = imei_event(data[_HEAD.size : start]).imei
    body = data[start:]
    event = decode_data_field(body, len(body), "teltonika-udp")
    if isinstance(event, AvlPacket):
        return AvlPacket(
            codec=event.codec, positions=event.positions, packet_id=packet_id, avl_packet_id=avl_packet_id, imei=imei
        )
    if isinstance(event, Unsupported):
        return event
    raise MalformedPayload(f"datagram carries a {type(event).__name__}, not AVL data")


def split_datagrams(data: bytes) -> list[bytes]:
    """Split bytes holding several datagrams back to back (as captured) using each length field."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise BadLength("one byte left where a datagram length was expected")
        end = pos + 2 + struct.unpack_from(">H", data, pos)[0]
        if end > len(data):
            raise BadLength(f"datagram declares {end - pos} bytes, {len(data) - pos} present")
        out.append(data[pos:end])
        pos = end
    return out


def ack_for(packet: AvlPacket, accepted: int | None = None) -> bytes:
    """``00 05 | packet id | 01 | AVL packet id | accepted count`` (echoing the datagram's ids)."""
    count = len(packet.positions) if accepted is None else accepted
    return _ACK.pack(5, packet.packet_id or 0, 1, packet.avl_packet_id or 0, count & 0xFF)
