"""Control messages between relay instances: token revocations, company connection limits, hints.

Two drivers implement :class:`Control`: :class:`MemoryControl` (embedded
mode, one process) and :class:`RedisControl` (distributed mode). Both keep
the same local caches, so ``is_revoked`` and ``company_limit`` are plain
dictionary reads on the hot path (every WebSocket authentication).

Redis layout (``<prefix>`` as given to :class:`RedisControl`):

* ``<prefix>:relay:revoked``: sorted set, token id (``jti``) -> expiry (unix s);
  expired members are removed with ``ZREMRANGEBYSCORE`` on every write and load;
* ``<prefix>:relay:company_limits``: hash, company id -> connection limit;
* ``<prefix>:relay:control``: pub/sub channel of msgpack-encoded messages.

Pub/sub is at-most-once, so it only carries hints: the durable state is in
the two keys, written in the same ``MULTI`` as the ``PUBLISH`` (so messages
leave Redis in the order the writes happened), and re-read every time the
subscriber (re)connects, after it has subscribed. An instance that was
disconnected therefore loses hints (``disconnect`` and the like) but always
converges on revocations and limits.

Every instance, the sender included, applies a message to its caches and
calls its listeners when the message comes back from Redis, so all
instances see writes in one order. The sender waits up to
:data:`ECHO_WAIT_S` for its own message and applies it itself if the
subscriber is down or slow (a late echo then updates the caches again, in
order, without calling the listeners twice).

Every Redis failure of a write surfaces as :class:`ControlError`; a write
that raised was not applied locally (though, if only the reply was lost,
Redis may have it; every write is idempotent, so the caller can retry).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any, Protocol

import msgspec
import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 5.0
"""Longest wait for a Redis reply before a write counts as failed."""
CONNECT_TIMEOUT_S = 2.0
ECHO_WAIT_S = 1.0
"""How long a sender waits for its own message to come back before applying it itself."""
HEARTBEAT_S = 2.0
"""A silent subscriber sends PING after this long; a second silent period means the connection is dead."""
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0


class ControlError(Exception):
    """Redis could not confirm a control write (unreachable, timed out, an error reply), or the control is closed."""

    reason = "control_unavailable"


class ControlMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One control message: ``kind`` selects the meaning of ``data``.

    ``revoke``: ``{"jti": str, "exp": float}``; ``company_limit``:
    ``{"company": str, "limit": int | None}`` (None: the override was
    removed); any other kind is a hint passed to listeners as is (for
    example ``{"kind": "disconnect", "data": {"user": ...}}``).
    """

    kind: str
    data: dict[str, Any] = {}


Listener = Callable[[ControlMessage], None]


class Control(Protocol):
    """See the module docstring. Listeners run in the event loop thread; their exceptions are logged."""

    async def start(self) -> None:
        """Load the durable state (unexpired revocations, limits) and start receiving messages."""
        ...

    async def close(self) -> None: ...

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every message, on every instance, the sending one included."""
        ...

    async def revoke(self, jti: str, exp: float) -> None:
        """Revoke token ``jti`` until ``exp`` (unix s), durably, then tell every instance (kind ``revoke``)."""
        ...

    def is_revoked(self, jti: str) -> bool:
        """Whether ``jti`` is revoked and its revocation has not expired (local cache, no I/O)."""
        ...

    async def set_company_limit(self, company: str, limit: int | None) -> None:
        """Override ``company``'s connection limit durably (None removes the override), then broadcast it."""
        ...

    def company_limit(self, company: str) -> int | None:
        """The override for ``company``, or None (local cache, no I/O)."""
        ...

    def company_limits(self) -> dict[str, int]:
        """Every override, as a copy."""
        ...

    async def publish(self, message: ControlMessage) -> None:
        """Send a hint to every instance; not durable, so an instance disconnected at the time misses it."""
        ...


class _Revocation(msgspec.Struct, frozen=True, kw_only=True):
    jti: str
    exp: float


class _LimitChange(msgspec.Struct, frozen=True, kw_only=True):
    company: str
    limit: Annotated[int, msgspec.Meta(ge=0)] | None


STATE_KINDS = frozenset({"revoke", "company_limit"})
"""Kinds that change durable state: sent only through ``revoke`` / ``set_company_limit``."""


class _CachedControl:
    """The local caches and listeners both drivers share; ``_commit`` is what a driver adds."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._revoked: dict[str, float] = {}
        # (exp, jti), soonest first, so pruning costs nothing while nothing expires.
        self._expiries: list[tuple[float, str]] = []
        self._limits: dict[str, int] = {}
        self._appliers: dict[str, Callable[[dict[str, Any]], None]] = {
            "revoke": self._apply_revoke,
            "company_limit": self._apply_limit,
        }
        self._closed = False

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def is_revoked(self, jti: str) -> bool:
        self._prune(time.time())
        return jti in self._revoked

    def company_limit(self, company: str) -> int | None:
        return self._limits.get(company)

    def company_limits(self) -> dict[str, int]:
        return dict(self._limits)

    async def revoke(self, jti: str, exp: float) -> None:
        await self._commit(ControlMessage(kind="revoke", data={"jti": jti, "exp": float(exp)}))

    async def set_company_limit(self, company: str, limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"company limit must be >= 0 or None, not {limit}")
        await self._commit(ControlMessage(kind="company_limit", data={"company": company, "limit": limit}))

    async def publish(self, message: ControlMessage) -> None:
        if message.kind in STATE_KINDS:
            raise ValueError(f"{message.kind!r} changes durable state: use revoke() or set_company_limit()")
        await self._commit(message)

    async def _commit(self, message: ControlMessage) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise ControlError("control closed")

    def _apply(self, message: ControlMessage) -> bool:
        """Update the caches from ``message``; False (logged) when its data does not fit its kind."""
        applier = self._appliers.get(message.kind)
        if applier is None:
            return True
        try:
            applier(message.data)
        except msgspec.ValidationError as exc:
            log.warning("control: dropping malformed %r message: %s", message.kind, exc)
            return False
        return True

    def _apply_revoke(self, data: dict[str, Any]) -> None:
        revocation = msgspec.convert(data, _Revocation)
        self._add_revocation(revocation.jti, revocation.exp)

    def _apply_limit(self, data: dict[str, Any]) -> None:
        change = msgspec.convert(data, _LimitChange)
        if change.limit is None:
            self._limits.pop(change.company, None)
        else:
            self._limits[change.company] = change.limit

    def _add_revocation(self, jti: str, exp: float) -> None:
        # A later expiry wins, as with ZADD GT in Redis: revoking again never shortens a revocation.
        if exp > self._revoked.get(jti, float("-inf")):
            self._revoked[jti] = exp
            heapq.heappush(self._expiries, (exp, jti))
        self._prune(time.time())

    def _prune(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            exp, jti = heapq.heappop(self._expiries)
            if self._revoked.get(jti) == exp:  # else superseded by a later expiry
                del self._revoked[jti]

    def _replace(self, revoked: dict[str, float], limits: dict[str, int]) -> None:
        known = self._revoked
        self._revoked, self._expiries, self._limits = {}, [], dict(limits)
        for jti, exp in revoked.items():
            self._add_revocation(jti, exp)
        # Revocations missed while disconnected: tell the listeners now, so open sockets using them close.
        for jti, exp in revoked.items():
            if jti not in known:
                self._deliver(ControlMessage(kind="revoke", data={"jti": jti, "exp": exp}))

    def _deliver(self, message: ControlMessage) -> None:
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:
                log.exception("control listener %r failed on a %r message", listener, message.kind)


class MemoryControl(_CachedControl):
    """The embedded :class:`Control`: one process, state in dictionaries, listeners called via ``call_soon``."""

    async def start(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True

    async def _commit(self, message: ControlMessage) -> None:
        self._check_open()
        self._apply(message)
        asyncio.get_running_loop().call_soon(self._deliver, message)


class _Envelope(ControlMessage, frozen=True, kw_only=True):
    """A message on the wire: ``origin`` and ``nonce`` let the sender recognise its own echo.

    Extra fields only, so a plain :class:`ControlMessage` decoder reads it and
    a message published without them (by an operator) is a valid envelope.
    """

    origin: str = ""
    nonce: int = 0


_encode = msgspec.msgpack.Encoder().encode
_decode_msgpack = msgspec.msgpack.Decoder(_Envelope).decode
_decode_json = msgspec.json.Decoder(_Envelope).decode


def decode_envelope(payload: bytes) -> _Envelope:
    """A wire message: msgpack as sent here, or JSON (``redis-cli PUBLISH <channel> '{"kind": ...}'``).

    A msgpack map never starts with ``{`` (0x7b is a positive fixint), so the first byte decides.
    """
    return (_decode_json if payload[:1] == b"{" else _decode_msgpack)(payload)


@asynccontextmanager
async def control_errors(operation: str) -> AsyncIterator[None]:
    """Bound Redis calls by :data:`COMMAND_TIMEOUT_S` and map every way they fail to :class:`ControlError`.

    The bound is ``asyncio.timeout`` here rather than redis-py's
    ``socket_timeout``: with one set, redis-py sends through
    ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation
    (``close`` cancelling the subscriber mid-reload would then hang).
    """
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            yield
    except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError too
        raise ControlError(f"{operation}: {type(exc).__name__}: {exc}") from exc


def raw_reply(response: Any, **options: Any) -> Any:
    return response


def flat_pairs(reply: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(key, value)`` pairs of a flat RESP2 reply (HGETALL, ZRANGEBYSCORE ... WITHSCORES)."""
    for key, value in zip(reply[::2], reply[1::2], strict=True):
        yield key.decode(), value


class RedisControl(_CachedControl):
    """The distributed :class:`Control` on Redis keys and one pub/sub channel (see the module docstring).

    ``instance_id`` names the subscriber connection (``CLIENT LIST``) and
    the origin of sent messages; a random suffix keeps two instances apart
    even when misconfigured with the same id.
    """

    def __init__(self, url: str, prefix: str = "fleetgate", *, instance_id: str = "") -> None:
        super().__init__()
        self._revoked_key = f"{prefix}:relay:revoked"
        self._limits_key = f"{prefix}:relay:company_limits"
        self._channel = f"{prefix}:relay:control"
        instance = instance_id or f"{socket.gethostname()}:{os.getpid()}"
        self._origin = f"{instance}:{secrets.token_hex(4)}"
        options: dict[str, Any] = {
            "protocol": 2,
            "socket_timeout": None,  # not redis-py's default of 5 s: see control_errors
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 0),  # failures are handled here: raised, or the subscriber reconnects
        }
        self._redis = redis.asyncio.Redis.from_url(url, **options)
        for command in ("HGETALL", "ZRANGEBYSCORE"):
            self._redis.set_response_callback(command, raw_reply)
        # A factory only: the subscriber owns one connection, outside any pool, for its whole life.
        # CLIENT SETNAME refuses spaces, which an instance id from the configuration may contain.
        name = re.sub(r"\s", "_", f"{prefix}-control:{instance}")
        self._subscriber_pool = redis.asyncio.ConnectionPool.from_url(url, client_name=name, **options)
        self._reader: asyncio.Task[None] | None = None
        self._live = False  # subscribed and loaded: a sender may wait for its echo
        self._nonce = 0
        self._echoes: dict[int, asyncio.Future[bool]] = {}  # nonce -> resolved when its echo was applied
        self._delivered_here: set[int] = set()  # nonces the sender applied itself, echo not yet seen

    async def start(self) -> None:
        """Subscribe, load the durable state, then keep receiving in a task; :class:`ControlError` if Redis fails."""
        self._check_open()
        if self._reader is None:
            connection = await self._connect()
            self._reader = asyncio.create_task(self._run(connection), name="control-subscriber")

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self._redis.aclose()
        await self._subscriber_pool.aclose()

    async def _commit(self, message: ControlMessage) -> None:
        self._check_open()
        self._nonce += 1
        nonce = self._nonce
        envelope = _Envelope(kind=message.kind, data=message.data, origin=self._origin, nonce=nonce)
        echo = self._echoes[nonce] = asyncio.get_running_loop().create_future()
        written = False
        try:
            async with control_errors(message.kind):
                pipe = self._redis.pipeline(transaction=True)
                for args in self._writes(message):
                    pipe.execute_command(*args)
                pipe.execute_command("PUBLISH", self._channel, _encode(envelope))
                await pipe.execute()
            written = True
            if self._live:
                with suppress(TimeoutError):
                    async with asyncio.timeout(ECHO_WAIT_S):
                        await asyncio.shield(echo)
        finally:
            del self._echoes[nonce]
            # Not heard back (subscriber down or slow, or our caller gave up
            # waiting): deliver it here, so a late echo is only applied.
            if written and not (echo.done() and echo.result()):
                self._delivered_here.add(nonce)
                self._apply(message)
                asyncio.get_running_loop().call_soon(self._deliver, message)

    def _writes(self, message: ControlMessage) -> list[tuple[Any, ...]]:
        """The commands that make ``message`` durable, run in one MULTI before its PUBLISH."""
        data = message.data
        if message.kind == "revoke":
            return [
                ("ZADD", self._revoked_key, "GT", data["exp"], data["jti"]),
                ("ZREMRANGEBYSCORE", self._revoked_key, "-inf", time.time()),
            ]
        if message.kind == "company_limit":
            if data["limit"] is None:
                return [("HDEL", self._limits_key, data["company"])]
            return [("HSET", self._limits_key, data["company"], data["limit"])]
        return []

    async def _run(self, connection: AbstractConnection | None) -> None:
        """Receive forever; on connection loss resubscribe (backoff up to 1 s) and reload the state."""
        delay = 0.0
        while True:
            if connection is None:
                await asyncio.sleep(delay)
                try:
                    connection = await self._connect()
                except Exception as exc:  # anything but ControlError is unexpected: log its traceback
                    delay = min(max(delay * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
                    unexpected = not isinstance(exc, ControlError)
                    log.warning("control: reconnect failed (%s); retrying in %.2f s", exc, delay, exc_info=unexpected)
                    continue
                delay = 0.0
                log.info("control: reconnected, state reloaded")
            try:
                await self._receive_until_lost(connection)
            except (RedisError, OSError) as exc:
                log.warning("control: subscriber connection lost (%s); reconnecting", exc)
            except Exception:
                log.exception("control: subscriber failed; reconnecting")
            finally:
                self._lost()
                await connection.disconnect(nowait=True)
            connection = None

    async def _connect(self) -> AbstractConnection:
        """A subscribed connection, with the durable state loaded AFTER subscribing so nothing falls in between."""
        connection: AbstractConnection = self._subscriber_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with control_errors("subscribe"):
                await connection.connect()  # type: ignore[no-untyped-call]
                await connection.send_command("SUBSCRIBE", self._channel)
                reply = await connection.read_response()
                if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
                    raise RedisError(f"unexpected SUBSCRIBE reply: {reply!r}")
            # Echoes of messages sent before this subscription will never come.
            self._delivered_here.clear()
            await self._load()
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        self._live = True
        return connection

    async def _load(self) -> None:
        """Replace the caches with what Redis holds (pruning expired revocations first)."""
        async with control_errors("load"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.execute_command("ZREMRANGEBYSCORE", self._revoked_key, "-inf", time.time())
            pipe.execute_command("ZRANGEBYSCORE", self._revoked_key, "-inf", "+inf", "WITHSCORES")
            pipe.execute_command("HGETALL", self._limits_key)
            _, revoked, limits = await pipe.execute()
        parsed_limits = {}
        for company, value in flat_pairs(limits):
            try:
                parsed_limits[company] = int(value)
            except ValueError:
                log.warning("control: ignoring company limit %r for %r in Redis", value, company)
        self._replace({jti: float(exp) for jti, exp in flat_pairs(revoked)}, parsed_limits)

    async def _receive_until_lost(self, connection: AbstractConnection) -> None:
        # read_response(timeout=...) returns None on a quiet connection, so a
        # silent peer (half-open TCP) is caught by an unanswered PING.
        pinged = False
        while True:
            reply = await connection.read_response(timeout=HEARTBEAT_S)
            if reply is None:
                if pinged:
                    raise ConnectionError(f"no reply to PING within {HEARTBEAT_S} s")
                await connection.send_command("PING")
                pinged = True
                continue
            pinged = False
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._receive(reply[2])

    def _receive(self, payload: bytes) -> None:
        try:
            envelope = decode_envelope(payload)
        except msgspec.DecodeError as exc:
            log.warning("control: dropping undecodable message: %s", exc)
            return
        message = ControlMessage(kind=envelope.kind, data=envelope.data)
        mine = envelope.origin == self._origin
        if not self._apply(message):
            return
        if mine and envelope.nonce in self._delivered_here:
            self._delivered_here.discard(envelope.nonce)
            return
        self._deliver(message)
        echo = self._echoes.get(envelope.nonce) if mine else None
        if echo is not None and not echo.done():
            echo.set_result(True)

    def _lost(self) -> None:
        """Senders waiting for an echo apply their message themselves: it will not come back now."""
        self._live = False
        for echo in self._echoes.values():
            if not echo.done():
                echo.set_result(False)


def open_control(driver: str, redis_url: str, prefix: str, instance_id: str = "") -> Control:
    """The :class:`Control` driver ``driver`` names (``memory`` or ``redis``); ``start`` it before use."""
    if driver == "redis":
        return RedisControl(redis_url, prefix, instance_id=instance_id)
    if driver == "memory":
        return MemoryControl()
    raise ValueError(f"unknown control driver {driver!r} (memory, redis)")
