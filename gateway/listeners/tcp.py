"""TCP device listeners: one asyncio ``Protocol`` per connection driving a pure codec.

The connection feeds bytes to its decoder and hands the decoded events to
one task at a time; while that task runs (a registry lookup, a bus commit)
reading is paused, so a device can never have more than one frame's worth
of work in flight and memory stays bounded. Replies are written only after
the frame's records were committed. Exceptions map to outcomes in one
place, :meth:`DeviceConnection._run`: a codec error or a bus failure closes
the connection with its reason; anything else is logged and closes with
``internal_error``. Nothing internal is ever sent to a device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, cast

from gateway import metrics
from gateway.bus.base import BusError
from gateway.ingest import Ingest
from gateway.records import Device
from gateway.sessions import ConnectionLimits, SessionTable
from gateway.settings import GatewaySettings
from trackcodecs import AvlPacket, CodecError, Event, ImeiPacket, Keepalive, Login, TimeRequest, gt06, teltonika
from trackcodecs.stream import StreamDecoder

log = logging.getLogger(__name__)


_children: dict[tuple[object, ...], Any] = {}


def _labelled(metric: Any, protocol: str, kind: str | None = None) -> Any:
    """A metric's labelled child, looked up once (``labels()`` costs a dict build and a lock per call)."""
    key = (metric, protocol, kind)
    child = _children.get(key)
    if child is None:
        child = _children[key] = (
            metric.labels(protocol=protocol) if kind is None else metric.labels(protocol=protocol, type=kind)
        )
    return child


class DeviceServer:
    """What all TCP connections share: settings, ingest, the session table and the limits."""

    def __init__(self, settings: GatewaySettings, ingest: Ingest) -> None:
        self.settings = settings
        self.ingest = ingest
        self.sessions = SessionTable()
        limits = settings.limits
        self.limits = ConnectionLimits(limits.max_connections, limits.max_connections_per_ip)
        self.connections: set[DeviceConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="tcp-timeouts")

    async def _sweep(self) -> None:
        """Close connections past the login or idle timeout (one timer for all, not one per connection)."""
        limits = self.settings.limits
        period = max(0.05, min(1.0, limits.login_timeout_s / 4, limits.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.device is None and now - conn.started > limits.login_timeout_s:
                    conn.close("login_timeout")
                elif now - conn.last_rx > limits.idle_timeout_s and conn.idle():
                    conn.close("idle_timeout")

    async def stop(self, timeout: float) -> None:
        """Let in-flight frames finish (their commits and ACKs), then close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for conn in list(self.connections):
            conn.close("shutdown")


class DeviceConnection(asyncio.Protocol):
    """One device's TCP connection. Subclasses give the decoder and how each event is handled."""

    protocol_name = "tcp"

    def __init__(self, server: DeviceServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.device: Device | None = None
        self.decoder = self.make_decoder()
        self.started = self.last_rx = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self._pending: deque[Event] = deque()
        self._received_at = datetime.now(UTC)
        self._rx_clock = 0.0
        self._error: CodecError | None = None
        self._ip = ""
        self._admitted = False
        self._closed = False

    def make_decoder(self) -> StreamDecoder:
        raise NotImplementedError

    async def handle(self, event: Event) -> None:
        raise NotImplementedError

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, asyncio's or uvloop's (which does not subclass asyncio.Transport).
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._ip = peer[0] if peer else ""
        refused = self.server.limits.admit(self._ip)
        if refused is not None:
            metrics.CONNECTIONS_REJECTED.labels(protocol=self.protocol_name, reason=refused).inc()
            self._closed = True
            transport.abort()
            return
        self._admitted = True
        self.server.connections.add(self)
        metrics.CONNECTIONS.labels(protocol=self.protocol_name).inc()
        metrics.CONNECTIONS_TOTAL.labels(protocol=self.protocol_name).inc()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.last_rx = time.monotonic()
        crc_before = self.decoder.crc_mismatches
        try:
            self.decoder.receive_data(data)
        except CodecError as exc:
            self._error = exc
            metrics.DECODE_ERRORS.labels(protocol=self.protocol_name, reason=exc.reason).inc()
            if exc.reason == "bad_crc":
                metrics.CRC_MISMATCHES.labels(protocol=self.protocol_name).inc()
        if self.decoder.crc_mismatches != crc_before:
            metrics.CRC_MISMATCHES.labels(protocol=self.protocol_name).inc(self.decoder.crc_mismatches - crc_before)
        self._pending.extend(self.decoder.events())
        if getattr(self.decoder, "discarded_bytes", 0) > self.server.settings.limits.max_frame:
            self.close("garbage")  # bytes that never form a frame: more than a frame's worth is enough
            return
        if self.task is None and (self._pending or self._error is not None):
            self._received_at = datetime.now(UTC)
            self._rx_clock = time.perf_counter()
            assert self.transport is not None
            self.transport.pause_reading()
            self.task = asyncio.get_running_loop().create_task(self._run())

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:  # the peer went first; our own closes are counted in close()
            reason = "peer_reset" if exc is not None else "peer_closed"
            metrics.CLOSED_CONNECTIONS.labels(protocol=self.protocol_name, reason=reason).inc()
        self._closed = True
        if not self._admitted:
            return
        self._admitted = False
        self.server.limits.release(self._ip)
        self.server.connections.discard(self)
        metrics.CONNECTIONS.labels(protocol=self.protocol_name).dec()
        if self.device is not None:
            self.server.sessions.release(self.device.imei, self)

    # -- processing

    async def _run(self) -> None:
        """Handle queued events one by one; the single place where failures become close reasons."""
        reason = None
        try:
            while self._pending and not self._closed:
                await self.handle(self._pending.popleft())
            if self._error is not None:
                reason = self._error.reason
        except BusError as exc:
            reason = exc.reason
        except CodecError as exc:
            reason = exc.reason
        except Exception:
            log.exception("unexpected error handling a %s frame", self.protocol_name)
            reason = "internal_error"
        finally:
            self.task = None
        if reason is not None:
            self.close(reason)
        elif not self._closed and self.transport is not None:
            self.transport.resume_reading()

    def idle(self) -> bool:
        return self.task is None

    def write(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(data)
            _labelled(metrics.ACK_LATENCY, self.protocol_name).observe(time.perf_counter() - self._rx_clock)

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        metrics.CLOSED_CONNECTIONS.labels(protocol=self.protocol_name, reason=reason).inc()
        if self.transport is not None:
            self.transport.close()

    def count_frame(self, event: Event) -> None:
        _labelled(metrics.FRAMES, self.protocol_name, str(event.__struct_config__.tag)).inc()

    async def login(self, imei: str) -> Device | None:
        device = await self.server.ingest.device_for(imei, self.protocol_name)
        if device is not None:
            self.device = device
            self.server.sessions.bind(imei, self)
        return device


class Gt06Connection(DeviceConnection):
    protocol_name = "gt06"

    def make_decoder(self) -> StreamDecoder:
        s = self.server.settings
        return gt06.Gt06Decoder(
            max_frame=s.limits.max_frame,
            crc_policy=s.codecs.gt06_crc,
            local_offset_min=s.codecs.gt06_device_time_offset_min,
        )

    async def handle(self, event: Event) -> None:
        """Login first; then commit what holds positions and answer what the protocol answers (1.10)."""
        self.count_frame(event)
        if isinstance(event, Login):
            if await self.login(event.imei) is None:
                self.close("unknown_device")  # no login reply: the device must not start sending
                return
        elif self.device is None:
            self.close("not_logged_in")
            return
        else:
            await self.server.ingest.commit_event(self.device, "gt06", event, self._received_at)
        now = datetime.now(UTC) if isinstance(event, TimeRequest) else self._received_at
        reply = gt06.reply_for(event, now)
        if reply is not None:
            self.write(reply)


class TeltonikaConnection(DeviceConnection):
    protocol_name = "teltonika"

    def make_decoder(self) -> StreamDecoder:
        s = self.server.settings
        return teltonika.TeltonikaDecoder(max_frame=s.limits.max_frame, crc_policy=s.codecs.teltonika_crc)

    async def handle(self, event: Event) -> None:
        """IMEI first (answer 01/00), then ACK each AVL packet with its record count once committed (2.1)."""
        if isinstance(event, Keepalive):
            return
        self.count_frame(event)
        if isinstance(event, ImeiPacket):
            if self.device is not None:
                self.close("second_imei")
            elif await self.login(event.imei) is None:
                self.write(teltonika.imei_reply(False))
                self.close("unknown_device")
            else:
                self.write(teltonika.imei_reply(True))
            return
        if self.device is None:
            self.close("not_logged_in")
            return
        if isinstance(event, AvlPacket):
            stored = await self.server.ingest.commit_event(self.device, "teltonika", event, self._received_at)
            self.write(teltonika.ack_for(event, accepted=stored))


async def start_tcp(server: DeviceServer, host: str, port: int, factory: type[DeviceConnection]) -> asyncio.Server:
    """Listen for one device protocol; connections share ``server``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: factory(server), host, port, backlog=4096, reuse_address=True)
