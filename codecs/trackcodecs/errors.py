"""Errors raised by the codecs.

Every error a codec raises is a :class:`CodecError`; nothing else escapes a
codec. Each class carries a stable ``reason`` slug, reused as the metric
label and the logged close reason, so renaming one is a breaking change::

    CodecError                      (reason: "codec_error")
    ├── FramingError                 the byte stream cannot be split into frames
    │   ├── FrameTooLarge            "frame_too_large": declared length over the limit
    │   ├── BadLength                "bad_length": declared length impossible (zero, too small)
    │   ├── BadPreamble              "bad_preamble": Teltonika packet without 00 00 00 00
    │   ├── BadImeiPacket            "bad_imei": Teltonika handshake not an ASCII IMEI
    │   └── Truncated                "truncated": end of input inside a frame
    ├── CrcMismatch                  "bad_crc": CRC differs and the policy is "reject"
    └── PayloadError                 the frame is intact but its content is not
        ├── CountMismatch            "count_mismatch": Teltonika N1 != N2
        └── MalformedPayload         "malformed": content shorter/longer than its layout

A codec that raised stays failed: later calls raise the same error. What it
decoded before the error is still returned by ``events()``.
"""

from __future__ import annotations


class CodecError(Exception):
    """Base of every error a codec raises on malformed input."""

    reason = "codec_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.reason)


class FramingError(CodecError):
    reason = "framing"


class FrameTooLarge(FramingError):
    reason = "frame_too_large"


class BadLength(FramingError):
    reason = "bad_length"


class BadPreamble(FramingError):
    reason = "bad_preamble"


class BadImeiPacket(FramingError):
    reason = "bad_imei"


class Truncated(FramingError):
    reason = "truncated"


class CrcMismatch(CodecError):
    reason = "bad_crc"


class PayloadError(CodecError):
    reason = "payload"


class CountMismatch(PayloadError):
    reason = "count_mismatch"


class MalformedPayload(PayloadError):
    reason = "malformed"


class NoFrame(FramingError):
    """Raised by one-shot decoding when the input held no frame at all (only skipped bytes)."""

    reason = "no_frame"
