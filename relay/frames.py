"""Server-to-client WebSocket frames, built once and written to many sockets.

RFC 6455 section 5.2: a server never masks its frames, and without extensions
(``permessage-deflate`` is off by default here) the bytes of a text frame
depend on the payload alone. So the hub serialises each outgoing message once
and writes the same ``bytes`` object to every subscriber's transport, where
``websockets.broadcast()`` would serialise it again for every connection.
"""

from __future__ import annotations

import struct

_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_FIN_TEXT = 0x81  # FIN bit + opcode 0x1 (text)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame holding ``payload`` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 65536:
        return _HEADER_16.pack(_FIN_TEXT, 126, n) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, n) + payload
