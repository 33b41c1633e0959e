"""The distributed bus: Redis Streams, with dedup atomic with the write (one Lua script).

Keys (``<prefix>`` from :class:`~gateway.settings.BusSettings`):

* ``<prefix>:positions``: stream of ``TrackedPosition`` (field ``d``: msgpack),
  trimmed with ``MAXLEN ~``;
* ``<prefix>:ingest``: stream of ``IngestPosition``, same layout;
* ``<prefix>:dedup:<record id>``: ``1`` with a TTL of the dedup window.

``publish`` is one ``EVALSHA`` per batch: for each record ``SET NX EX`` on its
dedup key and, only if that set it, ``XADD``. Running both inside one script
is what makes dedup atomic with the write: two gateways receiving the same
resent packet cannot both add it, and a record is never marked seen without
being in the stream (a failed ``XADD`` deletes the key it just set).

Every Redis failure (refused, reset, timed out, an error reply) surfaces as
:class:`~gateway.bus.base.BusError`; the client never retries by itself, so
a publish either returns after Redis replied (with ``appendfsync always``:
after the AOF fsync) or raises, and the caller decides. A device that resends
after a lost reply is caught by dedup.

Replies are parsed here from raw RESP2 rather than through redis-py's
response callbacks, whose shapes differ between versions and protocols.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import hiredis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.bus.base import BusError
from gateway.records import (
    IngestPosition,
    TrackedPosition,
    decode_ingest,
    decode_position,
    encode_msgpack,
)
from gateway.settings import BusSettings

T = TypeVar("T")

COMMAND_TIMEOUT_S = 5.0
"""Longest wait for a non-blocking command's reply before the bus counts as unavailable."""
CONNECT_TIMEOUT_S = 2.0
TAIL_BLOCK_MS = 1000
TAIL_COUNT = 1000

# KEYS[1] the stream, KEYS[2..] dedup keys; ARGV[1] window (s), ARGV[2] maxlen, ARGV[3..] payloads.
# Returns one 0/1 per record. pcall around XADD so that a failed write (OOM,
# wrong type) removes the dedup key it just set before the error propagates:
# otherwise the device's resend would be dropped as a duplicate of nothing.
PUBLISH_SCRIPT = """
local window, maxlen = ARGV[1], ARGV[2]
local written = {}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', window) then
    local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i + 1])
    if type(added) == 'table' and added.err then
      redis.call('DEL', KEYS[i])
      return added
    end
    written[i - 1] = 1
  else
    written[i - 1] = 0
  end
end
return written
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()


@contextmanager
def bus_errors(operation: str) -> Iterator[None]:
    """Map every way a Redis call can fail to :class:`BusError` (the one place this happens)."""
    try:
        yield
    except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError too
        raise BusError(f"{operation}: {type(exc).__name__}: {exc}") from exc


def raw_reply(response: Any, **options: Any) -> Any:
    return response


async def command(conn: redis.asyncio.Redis, *args: Any) -> Any:
    """``execute_command`` (untyped in redis-py): the one typed entry point for every call here."""
    return await conn.execute_command(*args)  # type: ignore[no-untyped-call]


async def packed_command(conn: redis.asyncio.Redis, packed: bytes) -> Any:
    """One command already packed by hiredis, on a pooled connection.

    redis-py's asyncio client packs arguments in Python, which for a batch of
    1000 records (2000+ arguments) costs about as much as the script run
    itself; ``hiredis.pack_command`` does it ten times faster in C. On any
    failure the connection disconnects itself and is reconnected on next use.
    """
    pool = conn.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.send_packed_command(packed)
        return await connection.read_response()
    finally:
        await pool.release(connection)


POOL_SIZE = 64
POOL_WAIT_S = 5.0


def client(url: str, socket_timeout: float | None) -> redis.asyncio.Redis:
    """A client that never retries on its own and hands stream replies back unparsed."""
    # A blocking pool: when a thousand devices log in at once, callers wait for a connection
    # instead of failing with MaxConnectionsError (the plain pool's behaviour at its cap).
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        protocol=2,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    conn = redis.asyncio.Redis.from_pool(pool)
    for command in ("XREAD", "XREADGROUP", "XREVRANGE", "XPENDING"):
        conn.set_response_callback(command, raw_reply)
    return conn


def stream_entries(reply: Any) -> list[tuple[bytes, bytes | None]]:
    """``(entry id, payload)`` pairs from an XREAD/XREADGROUP reply (one stream).

    The payload is None for an entry still pending in a group but already
    trimmed from the stream (Redis returns it with no fields).
    """
    if not reply:
        return []
    out = []
    for entry, fields in reply[0][1]:
        out.append((entry, None if not fields else dict(zip(fields[::2], fields[1::2], strict=True)).get(b"d")))
    return out


class RedisBus:
    """The Redis Streams :class:`~gateway.bus.base.Bus` (see the module docstring)."""

    def __init__(self, settings: BusSettings) -> None:
        prefix = settings.prefix
        self._positions = f"{prefix}:positions"
        self._ingest = f"{prefix}:ingest"
        self._dedup_prefix = f"{prefix}:dedup:"
        self._window_s = settings.dedup_window_s
        self._positions_maxlen = settings.positions_maxlen
        self._ingest_maxlen = settings.ingest_maxlen
        self._redis = client(settings.redis_url, COMMAND_TIMEOUT_S)
        # Blocking reads hold a connection for up to block_ms, so they get
        # their own pool without a socket timeout, bounded by asyncio instead.
        self._blocking = client(settings.redis_url, None)
        self._groups: set[tuple[str, str]] = set()
        self._backlog: dict[tuple[str, str, str], bytes] = {}
        self._closed = False

    async def connect(self) -> None:
        """Check that Redis answers and load the publish script, so a wrong URL fails at startup."""
        with bus_errors("connect"):
            await command(self._redis, "SCRIPT", "LOAD", PUBLISH_SCRIPT)

    async def publish(self, records: Sequence[TrackedPosition]) -> list[bool]:
        self._check_open()
        if not records:
            return []
        prefix = self._dedup_prefix
        args = (
            "EVALSHA",
            PUBLISH_SHA,
            len(records) + 1,
            self._positions,
            *[prefix + record.id for record in records],
            self._window_s,
            self._positions_maxlen,
            *map(encode_msgpack, records),
        )
        packed = hiredis.pack_command(cast(Any, args))  # its stub types the argument as a 1-tuple
        with bus_errors("publish"):
            try:
                written = await packed_command(self._redis, packed)
            except NoScriptError:
                # After a Redis restart or SCRIPT FLUSH; nothing ran, so the retry is safe.
                await command(self._redis, "SCRIPT", "LOAD", PUBLISH_SCRIPT)
                written = await packed_command(self._redis, packed)
        return [flag == 1 for flag in written]

    def tail(self, *, after: str = "$") -> AsyncIterator[tuple[str, TrackedPosition]]:
        """See :meth:`Bus.tail`. ``"$"`` is resolved at the first iteration (a round trip is needed).

        A Redis failure ends the iteration with :class:`BusError`; resume
        with ``tail(after=<last id seen>)`` to miss nothing still retained.
        """
        return self._tail(after)

    async def _tail(self, after: str) -> AsyncIterator[tuple[str, TrackedPosition]]:
        # A literal "$" on every XREAD would skip what arrives between two
        # calls, so it is pinned to the stream's current last id once.
        last: str | bytes = await self._last_entry() if after == "$" else after
        while True:
            reply = await self._blocking_call(
                TAIL_BLOCK_MS, "XREAD", "COUNT", TAIL_COUNT, "BLOCK", TAIL_BLOCK_MS, "STREAMS", self._positions, last
            )
            if reply is None:  # BLOCK timed out with nothing new, or the bus was closed meanwhile
                if self._closed:
                    return
                continue
            for entry, payload in stream_entries(reply):
                last = entry
                if payload is not None:
                    yield entry.decode(), decode_position(payload)

    async def _last_entry(self) -> bytes:
        with bus_errors("tail"):
            reply = await command(self._redis, "XREVRANGE", self._positions, "+", "-", "COUNT", 1)
        return reply[0][0] if reply else b"0-0"

    async def read_group(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, TrackedPosition]]:
        """See :meth:`Bus.read_group`.

        The first call of a consumer name on this bus returns that consumer's
        entries delivered earlier and never acknowledged (a restarted process
        reusing its name), then new ones. ``block_ms=0`` does not block.
        """
        return await self._read_group(self._positions, decode_position, group, consumer, count, block_ms)

    async def ack(self, group: str, entry_ids: Sequence[str]) -> None:
        await self._ack(self._positions, group, entry_ids)

    async def publish_ingest(self, items: Sequence[IngestPosition]) -> None:
        self._check_open()
        if not items:
            return
        pipe = self._redis.pipeline(transaction=False)
        for item in items:
            pipe.xadd(self._ingest, {"d": encode_msgpack(item)}, maxlen=self._ingest_maxlen, approximate=True)
        with bus_errors("publish_ingest"):
            await pipe.execute()

    async def read_ingest(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, IngestPosition]]:
        """Like :meth:`read_group`, on the ``ingest`` stream."""
        return await self._read_group(self._ingest, decode_ingest, group, consumer, count, block_ms)

    async def ack_ingest(self, group: str, entry_ids: Sequence[str]) -> None:
        await self._ack(self._ingest, group, entry_ids)

    async def length(self) -> int:
        with bus_errors("length"):
            return int(await command(self._redis, "XLEN", self._positions))

    async def pending(self, group: str, *, stream: str = "positions") -> int:
        """Delivered and not yet acknowledged entries of ``group`` on ``positions`` or ``ingest``."""
        key = self._positions if stream == "positions" else self._ingest
        with bus_errors("pending"):
            try:
                summary = await command(self._redis, "XPENDING", key, group)
            except ResponseError as exc:
                if str(exc).startswith("NOGROUP"):
                    return 0
                raise
        return int(summary[0])

    async def close(self) -> None:
        """Close both pools: tails end; group reads and writes raise :class:`BusError` from now on."""
        self._closed = True
        await self._redis.aclose()
        await self._blocking.aclose()

    async def _read_group(
        self, stream: str, decode: Callable[[bytes], T], group: str, consumer: str, count: int, block_ms: int
    ) -> list[tuple[str, T]]:
        self._check_open()
        await self._ensure_group(stream, group)
        backlog_key = (stream, group, consumer)
        while (cursor := self._backlog.get(backlog_key, b"0")) != b">":
            entries = stream_entries(await self._xreadgroup(stream, group, consumer, count, None, cursor))
            self._backlog[backlog_key] = entries[-1][0] if entries else b">"
            gone = [entry for entry, payload in entries if payload is None]
            if gone:  # trimmed while pending: nothing left to process
                await self._ack(stream, group, [entry.decode() for entry in gone])
            if len(gone) < len(entries):
                return [(entry.decode(), decode(payload)) for entry, payload in entries if payload is not None]
        block = block_ms if block_ms > 0 else None
        entries = stream_entries(await self._xreadgroup(stream, group, consumer, count, block, b">"))
        return [(entry.decode(), decode(payload)) for entry, payload in entries if payload is not None]

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("bus closed")

    async def _xreadgroup(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int | None, cursor: bytes
    ) -> Any:
        block = () if block_ms is None else ("BLOCK", block_ms)
        args = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, *block, "STREAMS", stream, cursor)
        try:
            reply = await self._blocking_call(block_ms or 0, *args)
        except BusError as exc:
            if not str(exc.__cause__).startswith("NOGROUP"):
                raise
            # The stream was deleted under us (FLUSHALL, a manual DEL): recreate the group and retry once.
            self._groups.discard((stream, group))
            await self._ensure_group(stream, group)
            reply = await self._blocking_call(block_ms or 0, *args)
        self._check_open()  # closed while blocked: the reply is None, not "nothing new"
        return reply

    async def _ensure_group(self, stream: str, group: str) -> None:
        if (stream, group) in self._groups:
            return
        with bus_errors("create group"):
            try:
                await command(self._redis, "XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise
        self._groups.add((stream, group))

    async def _ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            with bus_errors("ack"):
                await command(self._redis, "XACK", stream, group, *entry_ids)

    async def _blocking_call(self, block_ms: int, *args: Any) -> Any:
        """A command that may block ``block_ms`` on the server; None if the bus was closed meanwhile."""
        try:
            with bus_errors(str(args[0])):
                async with asyncio.timeout(block_ms / 1000 + COMMAND_TIMEOUT_S):
                    return await command(self._blocking, *args)
        except BusError:
            if self._closed:
                return None
            raise
