"""The buffering shared by the stream (TCP) decoders.

A subclass implements :meth:`StreamDecoder._drain`, which decodes every
complete frame at the start of an immutable ``bytes`` object and says how
much it consumed and how many bytes the next frame needs. The base class
keeps the remainder, and while the remainder is still short of what the next
frame needs it only appends, so a peer trickling bytes costs linear time.
"""

from __future__ import annotations

from .errors import CodecError, Truncated
from .events import Event


class StreamDecoder:
    """Sans-I/O surface of a per-connection decoder: ``receive_data``, ``receive_eof``, ``events``.

    Any :class:`CodecError` is final: the decoder keeps raising it. Events
    decoded before the error are still returned by :meth:`events`.
    """

    def __init__(self) -> None:
        self.crc_mismatches = 0
        self.frames = 0
        self._buf = bytearray()
        self._need = 0
        self._events: list[Event] = []
        self._error: CodecError | None = None

    def receive_data(self, data: bytes) -> None:
        """Decode every complete frame in what was buffered plus ``data``; keep the rest."""
        if self._error is not None:
            raise self._error
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf.clear()
        try:
            consumed, self._need = self._drain(data)
        except CodecError as exc:
            self._error = exc
            raise
        if consumed < len(data):
            self._buf += memoryview(data)[consumed:]

    def receive_eof(self) -> None:
        """The peer closed the stream: a partial frame left over is a :class:`Truncated` error."""
        if self._error is not None:
            raise self._error
        if self._buf:
            self._error = Truncated(f"{len(self._buf)} bytes of an incomplete frame at end of input")
            raise self._error

    def events(self) -> list[Event]:
        """Return and forget the events decoded so far."""
        out, self._events = self._events, []
        return out

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame (never more than one maximal frame)."""
        return len(self._buf)

    def _drain(self, data: bytes) -> tuple[int, int]:
        """Decode complete frames from the start of ``data``; return (bytes consumed, bytes the next frame needs)."""
        raise NotImplementedError
