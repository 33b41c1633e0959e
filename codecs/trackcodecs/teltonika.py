"""Teltonika over TCP: IMEI handshake, AVL packets (codec 8, 8E, 16) and GPRS commands (12-15).

Stream layout (docs/device-protocols.md 2.1, 2.2, 2.6)::

    IMEI packet:   length u16 (15) | IMEI ASCII          -> server answers 01 / 00
    data packet:   00 00 00 00 | data length u32 | data field | CRC u32 (upper 16 bits 0)
    data field:    codec | N1 | records / command | N2     (CRC-16/ARC over the data field)
    keep-alive:    FF

:class:`TeltonikaDecoder` splits the stream and decodes each packet into one
event; :func:`ack_for` builds the 4-byte record-count ACK to send once the
records are stored.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Literal

from msgspec.structs import replace

from .avl import AVL_CODECS, decode_records
from .crc import crc16_arc
from .errors import (
    BadImeiPacket,
    BadLength,
    BadPreamble,
    CountMismatch,
    CrcMismatch,
    FrameTooLarge,
    MalformedPayload,
)
from .events import AvlPacket, Command, CommandResponse, Event, ImeiPacket, Keepalive, Unsupported
from .stream import StreamDecoder

CrcPolicy = Literal["reject", "count"]

DEFAULT_MAX_FRAME = 32 * 1024
MAX_IMEI_LENGTH = 20
PREAMBLE = b"\x00\x00\x00\x00"

CODEC_12 = 0x0C
CODEC_13 = 0x0D
CODEC_14 = 0x0E
CODEC_15 = 0x0F
TYPE_COMMAND = 0x05
TYPE_RESPONSE = 0x06
TYPE_NACK = 0x11
TYPE_RS232 = 0x0B

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CMD_HEAD = struct.Struct(">BBBI")  # codec, quantity 1, type, payload size
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` passes the Luhn check that every IMEI's last digit satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def imei_event(raw: bytes) -> ImeiPacket:
    """Validate the ASCII digits of an IMEI packet."""
    if not raw.isdigit() or not raw.isascii():
        raise BadImeiPacket(f"IMEI packet is not ASCII digits: {raw[:20].hex()}")
    imei = raw.decode("ascii")
    return ImeiPacket(imei=imei, imei_valid=len(imei) == 15 and luhn_ok(imei))


class TeltonikaDecoder(StreamDecoder):
    """Sans-I/O decoder for one Teltonika TCP connection.

    Recognises the IMEI packet, data packets and the ``FF`` keep-alive at
    any packet boundary; enforcing "IMEI first" is the session's job. The
    declared data length is checked against ``max_frame`` as soon as its 8
    header bytes are in, before the rest is buffered. Any error is final for
    the connection (the device reconnects and resends what was not ACKed).
    """

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME, crc_policy: CrcPolicy = "reject") -> None:
        super().__init__()
        self.max_frame = max_frame
        self.crc_policy = crc_policy

    def _drain(self, data: bytes) -> tuple[int, int]:
        n = len(data)
        pos = 0
        append = self._events.append
        while True:
            if pos >= n:
                return pos, 1
            if data[pos] == 0xFF:
                append(Keepalive())
                pos += 1
                continue
            if n - pos < 2:
                return pos, 2
            imei_len = _U16.unpack_from(data, pos)[0]
            if imei_len:
                if imei_len > MAX_IMEI_LENGTH:
                    raise BadImeiPacket(f"IMEI packet length {imei_len} > {MAX_IMEI_LENGTH}")
                if n - pos < 2 + imei_len:
                    return pos, 2 + imei_len
                append(imei_event(data[pos + 2 : pos + 2 + imei_len]))
                pos += 2 + imei_len
                continue
            if n - pos < 4:
                return pos, 4
            if data[pos : pos + 4] != PREAMBLE:
                raise BadPreamble(f"expected 00 00 00 00, got {data[pos : pos + 4].hex()}")
            if n - pos < 8:
                return pos, 8
            length = _U32.unpack_from(data, pos + 4)[0]
            if length < 3:
                raise BadLength(f"data field length {length} cannot hold codec, N1 and N2")
            if length + 12 > self.max_frame:
                raise FrameTooLarge(f"declared packet size {length + 12} > {self.max_frame}")
            if n - pos < length + 12:
                return pos, length + 12
            append(self._decode_packet(data[pos + 8 : pos + 12 + length]))
            pos += length + 12

    def _decode_packet(self, packet: bytes) -> Event:
        size = len(packet) - 4
        crc_word = _U32.unpack_from(packet, size)[0]
        crc_ok = crc_word >> 16 == 0 and crc16_arc(packet[:size]) == crc_word
        if not crc_ok:
            if self.crc_policy == "reject":
                raise CrcMismatch(f"Teltonika CRC mismatch in codec 0x{packet[0]:02x} packet")
            self.crc_mismatches += 1
        self.frames += 1
        event = decode_data_field(packet, size, "teltonika")
        if not crc_ok and hasattr(event, "crc_ok"):
            event = replace(event, crc_ok=False)
        return event


def decode_data_field(data: bytes, end: int, protocol: str) -> Event:
    """Decode ``data[:end]`` = codec | N1 | body | N2 (shared by TCP packets and UDP datagrams)."""
    codec = data[0]
    if codec in AVL_CODECS:
        n1, n2 = data[1], data[end - 1]
        if n1 != n2:
            raise CountMismatch(f"N1 = {n1} but N2 = {n2}")
        positions, pos = decode_records(codec, data, 2, end - 1, n1)
        if pos != end - 1:
            raise MalformedPayload(f"{end - 1 - pos} bytes left after {n1} AVL records")
        return AvlPacket(codec=codec, positions=tuple(positions))
    if codec in _COMMAND_DECODERS:
        return _decode_command(data, end, protocol)
    return Unsupported(protocol=protocol, msg_type=codec, payload_hex=data[1:end].hex())


def _decode_command(data: bytes, end: int, protocol: str) -> Event:
    if end < _CMD_HEAD.size + 1:
        raise MalformedPayload("command packet shorter than its header")
    codec, n1, msg_type, size = _CMD_HEAD.unpack_from(data)
    n2 = data[end - 1]
    if n1 != n2:
        raise CountMismatch(f"quantity 1 = {n1} but quantity 2 = {n2}")
    if _CMD_HEAD.size + size != end - 1:
        raise MalformedPayload(f"command size {size} does not fill the {end} byte data field")
    payload = data[_CMD_HEAD.size : end - 1]
    decoder = _COMMAND_DECODERS[codec].get(msg_type)
    if decoder is None:
        return Unsupported(protocol=protocol, msg_type=codec, payload_hex=data[1:end].hex())
    return decoder(codec, msg_type, payload)


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace")


def _bcd_imei(raw: bytes) -> str:
    digits = raw.hex()
    if not digits.isdigit():
        raise MalformedPayload(f"IMEI field {digits!r} holds non-decimal nibbles")
    return digits[1:]  # 16 nibbles with a leading 0 (2.6)


def _cmd_12(codec: int, msg_type: int, payload: bytes) -> Event:
    return Command(protocol="teltonika", codec=codec, text=_text(payload))


def _resp_12(codec: int, msg_type: int, payload: bytes) -> Event:
    return CommandResponse(
        protocol="teltonika", codec=codec, message_type=msg_type, text=_text(payload), payload_hex=payload.hex()
    )


def _resp_13(codec: int, msg_type: int, payload: bytes) -> Event:
    """Codec 13: 4-byte timestamp (seconds, per the current specification) then the text."""
    if len(payload) < 4:
        raise MalformedPayload("codec 13 payload shorter than its timestamp")
    ts = _EPOCH + timedelta(seconds=_U32.unpack_from(payload)[0])
    return CommandResponse(
        protocol="teltonika",
        codec=codec,
        message_type=msg_type,
        text=_text(payload[4:]),
        payload_hex=payload.hex(),
        timestamp=ts,
    )


def _cmd_14(codec: int, msg_type: int, payload: bytes) -> Event:
    if len(payload) < 8:
        raise MalformedPayload("codec 14 payload shorter than its IMEI")
    return Command(protocol="teltonika", codec=codec, imei=_bcd_imei(payload[:8]), text=_text(payload[8:]))


def _resp_14(codec: int, msg_type: int, payload: bytes) -> Event:
    """Codec 14 answer: 0x06 = IMEI matches and the response follows; 0x11 = wrong IMEI (nACK)."""
    if len(payload) < 8:
        raise MalformedPayload("codec 14 payload shorter than its IMEI")
    return CommandResponse(
        protocol="teltonika",
        codec=codec,
        message_type=msg_type,
        imei=_bcd_imei(payload[:8]),
        text=_text(payload[8:]),
        payload_hex=payload.hex(),
    )


def _resp_15(codec: int, msg_type: int, payload: bytes) -> Event:
    """Codec 15 (RS232 data): Unix seconds (4), IMEI (8), data."""
    if len(payload) < 12:
        raise MalformedPayload("codec 15 payload shorter than timestamp + IMEI")
    ts = _EPOCH + timedelta(seconds=_U32.unpack_from(payload)[0])
    return CommandResponse(
        protocol="teltonika",
        codec=codec,
        message_type=msg_type,
        imei=_bcd_imei(payload[4:12]),
        text=_text(payload[12:]),
        payload_hex=payload.hex(),
        timestamp=ts,
    )


_COMMAND_DECODERS = {
    CODEC_12: {TYPE_COMMAND: _cmd_12, TYPE_RESPONSE: _resp_12},
    CODEC_13: {TYPE_COMMAND: _resp_13, TYPE_RESPONSE: _resp_13},
    CODEC_14: {TYPE_COMMAND: _cmd_14, TYPE_RESPONSE: _resp_14, TYPE_NACK: _resp_14},
    CODEC_15: {TYPE_RS232: _resp_15},
}


# --------------------------------------------------------------------------
# Encoders (2.1, 2.5, 2.6). Pure functions.


def imei_reply(accepted: bool) -> bytes:
    """The one-byte answer to the IMEI packet: 01 accept, 00 reject."""
    return b"\x01" if accepted else b"\x00"


def ack_for(packet: AvlPacket, accepted: int | None = None) -> bytes:
    """The 4-byte ACK: the number of records stored (all of the packet's by default)."""
    return _U32.pack(len(packet.positions) if accepted is None else accepted)


def reply_for(event: Event) -> bytes | None:
    """What the server sends for ``event`` when it accepts it (used by ``fleetgate decode``)."""
    if isinstance(event, ImeiPacket):
        return imei_reply(True)
    if isinstance(event, AvlPacket):
        return ack_for(event)
    return None


def frame_data_field(data_field: bytes) -> bytes:
    """Wrap a data field with preamble, length and CRC-16/ARC."""
    return PREAMBLE + _U32.pack(len(data_field)) + data_field + _U32.pack(crc16_arc(data_field))


def encode_command(text: str) -> bytes:
    """A codec 12 command (type 0x05) carrying ASCII ``text``."""
    raw = text.encode("ascii")
    return frame_data_field(_CMD_HEAD.pack(CODEC_12, 1, TYPE_COMMAND, len(raw)) + raw + b"\x01")


def encode_command_14(imei: str, text: str) -> bytes:
    """A codec 14 command addressed to ``imei`` (the device answers 0x11 if it is not that IMEI)."""
    if not (imei.isdigit() and len(imei) <= 16):
        raise ValueError("IMEI must be at most 16 decimal digits")
    payload = bytes.fromhex(imei.rjust(16, "0")) + text.encode("ascii")
    return frame_data_field(_CMD_HEAD.pack(CODEC_14, 1, TYPE_COMMAND, len(payload)) + payload + b"\x01")
