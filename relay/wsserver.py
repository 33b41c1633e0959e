"""The WebSocket server: one small ``asyncio.Protocol`` per socket driving websockets' sans-I/O core.

websockets' ``ServerProtocol`` does the handshake, framing, UTF-8 checks,
control frames and the 1009 size limit; this module only moves bytes, routes
the handshake path to an application (native protocol at ``/ws``, Pusher
later), and owns the timers. There is no task per connection: an idle
subscriber costs its protocol objects and its socket buffers, nothing more.

Outgoing messages take two paths:

* :meth:`WsConnection.send_text` goes through the protocol object (replies,
  errors, pings, close frames).
* :meth:`WsConnection.push` is the fan-out path: a frame built once by
  :mod:`relay.frames` is queued on the connection and written, joined with the
  other frames of the same event-loop turn, by :meth:`WsServer.flush`. This is
  consistent with the protocol object because a server's text frames are
  unmasked, no extension is negotiated, and a frame is only pushed while the
  connection is OPEN and not in the middle of a fragmented send (the relay
  never fragments). Before the protocol writes anything itself, queued frames
  are written first, so the order of messages is kept.

Exceptions map to close codes in exactly one place, :meth:`WsConnection.data_received`:
a protocol error closes as websockets decides (1002, 1007, 1009); an unexpected
exception in an application is logged with its traceback and closes with
1011, never echoing internals to the peer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, SEND_EOF
from websockets.server import ServerProtocol

from relay import metrics
from relay.settings import RelaySettings

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # after our close frame, wait this long for the peer's before dropping the TCP connection
SLOW_CLOSE_TIMEOUT_S = 5.0  # a slow consumer gets this long to read what is queued (ending in a 4008 close frame)

CODE_SLOW_CONSUMER = 4008
CODE_PING_TIMEOUT = 4010
CODE_GOING_AWAY = 1001
CODE_INTERNAL = 1011


class Session(Protocol):
    """What an application attaches to one accepted socket."""

    def on_text(self, data: bytes) -> None: ...

    def on_binary(self, data: bytes) -> None: ...

    def on_close(self) -> None: ...


class App(Protocol):
    """A WebSocket application mounted on a path (see :class:`WsServer`)."""

    name: str  # metric label: "native" | "pusher"
    max_message: int  # larger client messages close with 1009
    ping_timeout_code: int  # close code when a ping goes unanswered
    ping_interval_s: float  # a ping frame to a socket quiet for this long
    ping_timeout_s: float  # no answer to it within this: close with ping_timeout_code

    def match(self, path: str) -> bool: ...

    def open(self, conn: WsConnection, request: Request) -> Session | Response:
        """A session for the accepted socket, or an HTTP response that refuses the handshake."""
        ...


class WsConnection(asyncio.Protocol):
    """One client socket. Applications call :meth:`send_text`, :meth:`push` and :meth:`close`."""

    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.protocol = ServerProtocol(max_size=server.settings.max_message)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.app_name = "none"
        self.role = "none"  # metric label, set by the application once authenticated
        self.peer_ip = ""
        self.open = False  # OPEN and accepting pushed frames
        self.pending: list[bytes] | None = None  # frames pushed this event-loop turn
        self.hold: list[bytes] | None = None  # while set, pushed frames wait here (an application sends a snapshot)
        self.last_rx = 0.0
        self.ping_sent_at = 0.0  # 0: no ping outstanding
        self.close_reason = "client"
        self.ping_timeout_code = CODE_PING_TIMEOUT
        self.ping_interval = server.settings.ping_interval_s
        self.ping_timeout = server.settings.ping_timeout_s
        self._fragments: list[bytes] | None = None
        self._fragment_binary = False
        self._timers: list[asyncio.TimerHandle] = []

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.server.connections.add(self)
        self.last_rx = self.server.loop.time()
        # The handshake itself must finish within the auth timeout too.
        self.call_later(self.server.settings.auth_timeout_s, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.server.loop.time()
        self.ping_sent_at = 0.0
        self.protocol.receive_data(data)
        try:
            for event in self.protocol.events_received():
                if isinstance(event, Request):
                    self._handshake(event)
                elif isinstance(event, Frame):
                    self._frame(event)
        except Exception:
            log.exception("unexpected error in %s session; closing with 1011", self.app_name)
            self.close(CODE_INTERNAL, "internal error", reason="internal_error")
        self.flush_protocol()
        if self.protocol.close_expected():
            self.call_later(CLOSE_TIMEOUT_S, self.abort)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self.flush_protocol()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        was_open = self.session is not None
        self.open = False
        self.pending = None
        if was_open:
            metrics.WS_CLOSED.labels(protocol=self.app_name, reason=self.close_reason).inc()
            metrics.WS_CONNECTIONS.labels(protocol=self.app_name, role=self.role).dec()
            session, self.session = self.session, None
            assert session is not None
            session.on_close()

    # --- handshake and frames ----------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        app = self.server.route(request.path)
        if app is None:
            self._refuse(404, "no WebSocket application at this path\n", "bad_path")
            return
        if len(self.server.connections) > self.server.settings.max_connections:
            self._refuse(503, "too many connections\n", "limit_total")
            return
        response = self.protocol.accept(request)
        if response.status_code != 101:
            metrics.WS_REJECTED.labels(reason="bad_request").inc()
            self.protocol.send_response(response)
            return
        opened = app.open(self, request)
        if isinstance(opened, Response):
            metrics.WS_REJECTED.labels(reason="refused").inc()
            self.protocol.send_response(opened)
            return
        self.protocol.send_response(response)
        self.protocol.max_message_size = app.max_message
        self.ping_timeout_code = app.ping_timeout_code
        self.ping_interval, self.ping_timeout = app.ping_interval_s, app.ping_timeout_s
        self.app_name = app.name
        self.session = opened
        self.open = True
        metrics.WS_OPENED.labels(protocol=app.name).inc()
        metrics.WS_CONNECTIONS.labels(protocol=app.name, role=self.role).inc()

    def _refuse(self, status: int, text: str, reason: str) -> None:
        metrics.WS_REJECTED.labels(reason=reason).inc()
        self.protocol.send_response(self.protocol.reject(status, text))

    def _frame(self, frame: Frame) -> None:
        session = self.session
        if session is None:
            return
        opcode = frame.opcode
        data = bytes(frame.data)  # the parser gives bytes; the type admits any buffer
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                (session.on_text if opcode is Opcode.TEXT else session.on_binary)(data)
            else:  # first fragment; websockets enforces max_size over the whole message
                self._fragments = [data]
                self._fragment_binary = opcode is Opcode.BINARY
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(data)
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = None
                (session.on_binary if self._fragment_binary else session.on_text)(data)
        elif opcode is Opcode.CLOSE:
            self.open = False
            if self.close_reason == "client":
                self.close_reason = _close_reason_of(self.protocol.close_code)

    def _handshake_timeout(self) -> None:
        if self.session is None:
            self.abort()

    # --- sending ---------------------------------------------------------------------------

    def flush_protocol(self) -> None:
        """Write what the protocol object queued (after any pushed frames, to keep order)."""
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if self.pending:
                self._write_pending()
            if data is SEND_EOF or data == SEND_EOF:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            else:
                transport.write(data)

    def send_text(self, data: bytes | str) -> None:
        """Send one message through the protocol object (replies, errors)."""
        if self.protocol.state is not OPEN:
            return
        self.protocol.send_text(data.encode() if isinstance(data, str) else data)
        self.flush_protocol()

    def push(self, frame: bytes) -> None:
        """Queue a prebuilt frame (fan-out path); written with the turn's other frames by :meth:`WsServer.flush`."""
        if not self.open:
            return
        if self.hold is not None:
            self.hold.append(frame)
            return
        pending = self.pending
        if pending is None:
            self.pending = [frame]
            self.server.dirty.append(self)
        else:
            pending.append(frame)

    def _write_pending(self) -> None:
        pending, self.pending = self.pending, None
        transport = self.transport
        if not pending or transport is None or not self.open:
            return
        if transport.get_write_buffer_size() > self.server.settings.send_buffer_max:
            self._drop_slow()
            return
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _drop_slow(self) -> None:
        """The client does not read fast enough: close with 4008 after what is queued, drop it if still stuck."""
        metrics.SLOW_CONSUMERS.labels(protocol=self.app_name).inc()
        log.info("slow consumer: send buffer over %d bytes, disconnecting", self.server.settings.send_buffer_max)
        self.close(CODE_SLOW_CONSUMER, "slow consumer", reason="slow_consumer", timeout=SLOW_CLOSE_TIMEOUT_S)

    def close(self, code: int, message: str = "", *, reason: str = "server", timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Start the closing handshake with ``code``; the TCP connection is dropped after ``timeout``."""
        self.open = False
        self.close_reason = reason
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, message)
            self.flush_protocol()
        self.call_later(timeout, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        handle = self.server.loop.call_later(delay, callback)
        self._timers.append(handle)
        return handle

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        handle = self.server.loop.call_at(when, callback)
        self._timers.append(handle)
        return handle

    def set_role(self, role: str) -> None:
        """Move this socket's gauge series from its current role to ``role`` (after authentication)."""
        if self.session is not None:
            metrics.WS_CONNECTIONS.labels(protocol=self.app_name, role=self.role).dec()
            metrics.WS_CONNECTIONS.labels(protocol=self.app_name, role=role).inc()
        self.role = role


class Inbox:
    """One socket's client messages, handled in order and one at a time.

    The handling task exists only while messages wait (an idle socket costs
    no task); past ``max_waiting`` queued messages the socket stops being
    read until half of them are done. An exception from ``handle`` is our
    bug: logged, and the socket closed with 1011.
    """

    def __init__(self, conn: WsConnection, handle: Callable[[bytes], Awaitable[None]], max_waiting: int = 16) -> None:
        self.conn = conn
        self.handle = handle
        self.max_waiting = max_waiting
        self._waiting: collections.deque[bytes] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False

    def put(self, data: bytes) -> None:
        self._waiting.append(data)
        if self._worker is None:
            self._worker = asyncio.create_task(self._drain())
        elif len(self._waiting) >= self.max_waiting and not self._paused and self.conn.transport is not None:
            self._paused = True
            self.conn.transport.pause_reading()

    def clear(self) -> None:
        self._waiting.clear()

    async def _drain(self) -> None:
        conn = self.conn
        try:
            while self._waiting and conn.open:
                await self.handle(self._waiting.popleft())
                if self._paused and len(self._waiting) < self.max_waiting // 2 and conn.transport is not None:
                    self._paused = False
                    conn.transport.resume_reading()
        except Exception:
            log.exception("unexpected error in a %s session; closing with 1011", conn.app_name)
            conn.close(CODE_INTERNAL, "internal error", reason="internal_error")
        finally:
            self._worker = None


def _close_reason_of(code: int | None) -> str:
    if code == 1009:
        return "too_big"
    if code in (1002, 1007):
        return "protocol_error"
    return "client"


class WsServer:
    """Listens, routes handshakes to apps, flushes pushed frames once per turn, and pings."""

    def __init__(self, settings: RelaySettings, apps: list[App]) -> None:
        self.settings = settings
        self.apps = apps
        self.connections: set[WsConnection] = set()
        self.dirty: list[WsConnection] = []
        self.server: asyncio.Server | None = None
        self.loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._flush_interval = settings.flush_interval_ms / 1000
        self._pinger: asyncio.Task[None] | None = None

    def route(self, path: str) -> App | None:
        for app in self.apps:
            if app.match(path):
                return app
        return None

    async def start(self, host: str, port: int) -> None:
        self.server = await self.loop.create_server(lambda: WsConnection(self), host, port, backlog=4096)
        self._pinger = asyncio.create_task(self._ping_loop(), name="ws-pinger")

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def schedule_flush(self) -> None:
        """Call after pushing frames: the joined writes happen once, ``flush_interval_ms`` later.

        The interval trades a few milliseconds of latency for far fewer system
        calls under load: every frame a socket gets within it goes out in one
        ``write()``. 0 flushes at the end of the current event-loop turn.
        """
        if not self._flush_scheduled and self.dirty:
            self._flush_scheduled = True
            if self._flush_interval > 0:
                self.loop.call_later(self._flush_interval, self.flush)
            else:
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn._write_pending()

    async def _ping_loop(self) -> None:
        """One timer for every socket: ping the quiet ones, close those whose ping went unanswered."""
        shortest = min([self.settings.ping_interval_s, self.settings.ping_timeout_s]
                       + [min(app.ping_interval_s, app.ping_timeout_s) for app in self.apps])  # fmt: skip
        tick = max(0.05, shortest / 4)
        ping = b"fg"
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for conn in list(self.connections):
                if conn.session is None or conn.protocol.state is not OPEN:
                    continue
                if conn.ping_sent_at:
                    if now - conn.ping_sent_at >= conn.ping_timeout:
                        conn.close(conn.ping_timeout_code, "ping timeout", reason="ping_timeout")
                elif now - conn.last_rx >= conn.ping_interval:
                    conn.ping_sent_at = now
                    conn.protocol.send_ping(ping)
                    conn.flush_protocol()

    async def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, send every client 1001 (going away), drop what remains after ``timeout``."""
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.session is not None:
                conn.close(CODE_GOING_AWAY, "server shutting down", reason="shutdown", timeout=timeout)
            else:
                conn.abort()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
