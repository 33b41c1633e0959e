"""A tiny HTTP/1.1 server for operations: ``GET /metrics`` and ``GET /healthz``.

The gateway process in distributed mode serves no other HTTP, so pulling in a
web framework for two read-only endpoints would be all cost. This server reads
one request head (bounded size, bounded time), answers, and closes the
connection (``Connection: close``): Prometheus and load-balancer health checks
open a connection per request anyway, and no keep-alive means no per-connection
state to bound. Request bodies are never read.

``health`` is a callable returning a JSON-able dict; ``{"status": "ok", ...}``
answers 200, any other status (or an exception) 503. Internals of a failing
health check are logged, never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway import metrics

__all__ = ["HealthCheck", "start_ops_server"]

log = logging.getLogger(__name__)

HealthCheck = Callable[[], dict[str, Any]]
TailSource = Callable[[bool], AsyncIterator[bytes]]
"""``tail(from_start)``: committed records as JSON lines, for ``GET /tail`` (``?from=start``)."""

MAX_HEADER_BYTES = 8 * 1024
READ_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
LINGER_S = 1.0
LINGER_MAX_BYTES = 64 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_NDJSON = "application/x-ndjson"


class _Response:
    __slots__ = ("body", "content_type", "extra", "status")

    def __init__(self, status: int, body: bytes, content_type: str = _TEXT, extra: str = "") -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra

    def encode(self, *, head_only: bool) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            f"Cache-Control: no-store\r\n"
            f"{self.extra}"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + (b"" if head_only else self.body)


def _plain(status: int, extra: str = "") -> _Response:
    return _Response(status, f"{_REASONS[status]}\n".encode(), extra=extra)


class _OpsHandler:
    """Per-server state: the health callable, the limits and the count of open connections."""

    def __init__(
        self, health: HealthCheck, *, read_timeout: float, max_connections: int, tail: TailSource | None = None
    ) -> None:
        self.health = health
        self.tail = tail
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.open = 0
        self.routes: dict[str, Callable[[], _Response]] = {"/metrics": self.metrics, "/healthz": self.healthz}

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Python 3.11's start_server logs a cancelled handler task (at loop shutdown) as an
        # error; 3.12 does not. Nothing awaits this task, so ending it quietly loses nothing.
        with contextlib.suppress(asyncio.CancelledError):
            await self.serve(reader, writer)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            if self.open > self.max_connections:
                return  # shed load: close without reading
            response, head_only = await self.respond(reader)
            if response is not None and response.status == 200 and response.content_type == _NDJSON:
                await self.stream_tail(reader, writer, from_start=response.extra == "from=start")
            elif response is not None:
                writer.write(response.encode(head_only=head_only))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                await self.linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT_S)

    async def linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drain what the peer still sends, briefly.

        Closing a socket with unread input (an oversize head, a body) makes the
        kernel send RST, which can destroy the response before the client reads
        it; waiting for the client's own close avoids that.
        """
        if not writer.can_write_eof():
            return
        writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                for _ in range(LINGER_MAX_BYTES // 4096):
                    if not await reader.read(4096):
                        break

    async def respond(self, reader: asyncio.StreamReader) -> tuple[_Response | None, bool]:
        """Read one request head and build its response; None when the peer left without asking."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except asyncio.LimitOverrunError:
            return _plain(431), False
        except asyncio.IncompleteReadError:
            return None, False
        except TimeoutError:
            return _plain(408), False
        return self.route(head)

    async def stream_tail(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_start: bool
    ) -> None:
        """``GET /tail``: an endless NDJSON body (one committed record per line) until the client leaves."""
        assert self.tail is not None
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + _NDJSON.encode() + b"\r\nConnection: close\r\n\r\n")
        async for line in self.tail(from_start):
            writer.write(line)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            if reader.at_eof():
                return

    def route(self, head: bytes) -> tuple[_Response, bool]:
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _plain(400), False
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target == b"/tail" and self.tail is not None and method == b"GET":
            query = parts[1].split(b"?", 1)[1] if b"?" in parts[1] else b""
            return _Response(200, b"", _NDJSON, extra=query.decode("ascii", "replace")), False
        endpoint = self.routes.get(target.decode("ascii", "replace"))
        if endpoint is None:
            return _plain(404), method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return _plain(405, extra="Allow: GET, HEAD\r\n"), False
        return endpoint(), method == b"HEAD"

    def metrics(self) -> _Response:
        return _Response(200, metrics.render(), metrics.CONTENT_TYPE)

    def healthz(self) -> _Response:
        try:
            report = self.health()
            body = json.dumps(report, default=str).encode()
        except Exception:
            log.exception("health check failed")
            return _Response(503, b'{"status":"error"}', _JSON)
        return _Response(200 if report.get("status") == "ok" else 503, body, _JSON)


async def start_ops_server(
    host: str,
    port: int,
    health: HealthCheck,
    *,
    max_header: int = MAX_HEADER_BYTES,
    read_timeout: float = READ_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    tail: TailSource | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` (0: any free port; read it from ``server.sockets``) and serve the ops endpoints.

    Request heads over ``max_header`` bytes get 431, heads not complete within
    ``read_timeout`` seconds get 408, connections beyond ``max_connections`` are
    closed unanswered. With ``tail``, ``GET /tail`` streams committed records
    (how ``fleetgate tail`` watches an embedded process). The caller owns the
    returned server (``close()``, ``wait_closed()``).
    """
    handler = _OpsHandler(health, read_timeout=read_timeout, max_connections=max_connections, tail=tail)
    # The stream buffer limit is what makes readuntil() stop at max_header bytes.
    return await asyncio.start_server(handler, host, port, limit=max_header)
