"""The Redis link store (distributed mode): every relay sees the same links, sessions and codes.

Keys, under ``{prefix}:``:

* ``link:{uuid}``                hash: ``record`` (msgpack ``TrackingLink``), ``company``, ``asset``
  (where the link is indexed, so a replacing put can move it)
* ``company-links:{company}``    sorted set of uuids, score = ``created_at`` in µs (exact below 2**53)
* ``asset-links:{asset}``        set of uuids of the links showing the asset now
* ``link-session:{token hash}``  msgpack ``LinkSession``, PX TTL = ``expires_at`` - now
* ``link-sessions:{uuid}``       sorted set of a link's token hashes, score = expiry (ms); expires with its last
* ``link-code:{uuid}:{email}``   msgpack ``EmailCode``, PX TTL = ``expires_at`` - now
* ``link-codes:{uuid}``          sorted set of a link's pending e-mails, score = expiry (ms); likewise

Writes that touch several keys are Lua scripts (atomic, one round trip), which build the keys of
other companies and assets from prefix arguments, as a standalone Redis allows (as in
:mod:`gateway.state.redis`). The per-link sorted sets drop expired members on every put, so they
stay as small as the number of live sessions. Key TTLs are rounded up to the millisecond, and a
read also compares ``expires_at`` with now, so an expired session or code is never returned.
Every Redis or socket failure is a :class:`~relay.links.store.LinkStoreError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.records import encode_msgpack
from relay.links.model import EmailCode, LinkSession, TrackingLink
from relay.links.store import LinkStoreError

_decode_link = msgspec.msgpack.Decoder(TrackingLink).decode
_decode_session = msgspec.msgpack.Decoder(LinkSession).decode
_decode_code = msgspec.msgpack.Decoder(EmailCode).decode

# KEYS: link; ARGV: uuid, record, company, asset, created µs, "company-links:" prefix, "asset-links:" prefix.
# A link that changed asset (or company) leaves the old index.
_PUT_LINK = """
local old = redis.call('HMGET', KEYS[1], 'company', 'asset')
if old[1] and old[1] ~= ARGV[3] then
    redis.call('ZREM', ARGV[6] .. old[1], ARGV[1])
end
if old[2] and old[2] ~= ARGV[4] then
    redis.call('SREM', ARGV[7] .. old[2], ARGV[1])
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'company', ARGV[3], 'asset', ARGV[4])
redis.call('ZADD', ARGV[6] .. ARGV[3], ARGV[5], ARGV[1])
redis.call('SADD', ARGV[7] .. ARGV[4], ARGV[1])
"""

# KEYS: link, link-sessions:{uuid}, link-codes:{uuid}
# ARGV: uuid, "company-links:" prefix, "asset-links:" prefix, "link-session:" prefix, "link-code:{uuid}:" prefix.
# Returns 1 if the link existed; its sessions and codes go either way.
_DELETE_LINK = """
for _, hash in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    redis.call('DEL', ARGV[4] .. hash)
end
for _, email in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    redis.call('DEL', ARGV[5] .. email)
end
redis.call('DEL', KEYS[2], KEYS[3])
local old = redis.call('HMGET', KEYS[1], 'company', 'asset')
if not old[1] then
    return 0
end
redis.call('ZREM', ARGV[2] .. old[1], ARGV[1])
redis.call('SREM', ARGV[3] .. old[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: the record's key, its link's sorted set; ARGV: record, TTL ms, member, expiry ms, now ms.
# A record with no time left replaces what was there with nothing. The set lives as long as its last member.
_PUT_EXPIRING = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
if tonumber(ARGV[2]) <= 0 then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[3])
    return
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], last[2])
"""

# KEYS: link-sessions:{uuid}; ARGV: "link-session:" prefix. Returns how many sessions were still live.
_DELETE_SESSIONS = """
local live = 0
for _, hash in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    live = live + redis.call('DEL', ARGV[1] .. hash)
end
redis.call('DEL', KEYS[1])
return live
"""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch, exact; naive times count as UTC (as in the SQLite driver)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _US


def _live(expires_at: datetime) -> bool:
    return epoch_us(expires_at) > epoch_us(datetime.now(UTC))


@contextmanager
def _unavailable() -> Iterator[None]:
    """Map every way a Redis call can fail to :class:`LinkStoreError` (the one place this happens)."""
    try:
        yield
    except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError too
        raise LinkStoreError(f"redis: {type(exc).__name__}: {exc}") from exc


def _expiring_args(record: bytes, member: str, expires_at: datetime) -> list[str | int | bytes]:
    """ARGV of ``_PUT_EXPIRING``. Milliseconds, the expiry rounded up: a key outlives ``expires_at`` by < 1 ms."""
    expires_ms, now_ms = -(-epoch_us(expires_at) // 1000), epoch_us(datetime.now(UTC)) // 1000
    return [record, expires_ms - now_ms, member, expires_ms, now_ms]


class RedisLinkStore:
    """:class:`relay.links.store.LinkStore` on the Redis at ``url``, keys under ``prefix``.

    ``timeout_s`` bounds connecting, each reply and the wait for a pooled connection.
    """

    def __init__(self, url: str, prefix: str = "fleetgate", *, timeout_s: float = 5.0) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=timeout_s, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._link = f"{prefix}:link:"
        self._company_links = f"{prefix}:company-links:"
        self._asset_links = f"{prefix}:asset-links:"
        self._session = f"{prefix}:link-session:"
        self._link_sessions = f"{prefix}:link-sessions:"
        self._code = f"{prefix}:link-code:"
        self._link_codes = f"{prefix}:link-codes:"
        self._put_link = self._redis.register_script(_PUT_LINK)
        self._delete_link = self._redis.register_script(_DELETE_LINK)
        self._put_expiring = self._redis.register_script(_PUT_EXPIRING)
        self._delete_sessions = self._redis.register_script(_DELETE_SESSIONS)
        self._closed = False

    async def put_link(self, link: TrackingLink) -> None:
        args: list[str | int | bytes] = [link.uuid, encode_msgpack(link), link.company_id, link.asset_id]
        args += [epoch_us(link.created_at), self._company_links, self._asset_links]
        with self._available():
            await self._put_link(keys=[self._link + link.uuid], args=args)

    async def get_link(self, uuid: str) -> TrackingLink | None:
        with self._available():
            blob = cast(bytes | None, await self._redis.hget(self._link + uuid, "record"))
        return None if blob is None else _decode_link(blob)

    async def delete_link(self, uuid: str) -> bool:
        keys = [self._link + uuid, self._link_sessions + uuid, self._link_codes + uuid]
        args = [uuid, self._company_links, self._asset_links, self._session, f"{self._code}{uuid}:"]
        with self._available():
            return bool(await self._delete_link(keys=keys, args=args))

    async def list_links(self, company_id: str) -> list[TrackingLink]:
        with self._available():
            uuids = cast(list[bytes], await self._redis.zrevrange(self._company_links + company_id, 0, -1))
        return await self._links(uuids)  # ZREVRANGE: newest first, equal times by uuid descending

    async def links_for_asset(self, asset_id: str) -> list[TrackingLink]:
        with self._available():
            uuids = cast(set[bytes], await self._redis.smembers(self._asset_links + asset_id))
        links = await self._links(sorted(uuids))
        return sorted(links, key=lambda link: (epoch_us(link.created_at), link.uuid), reverse=True)

    async def _links(self, uuids: list[bytes]) -> list[TrackingLink]:
        if not uuids:
            return []
        with self._available():
            async with self._redis.pipeline(transaction=False) as pipe:
                for uuid in uuids:
                    pipe.hget(self._link + uuid.decode(), "record")
                blobs = cast(list[bytes | None], await pipe.execute())
        return [_decode_link(blob) for blob in blobs if blob is not None]  # None: deleted in between

    async def put_session(self, session: LinkSession) -> None:
        keys = [self._session + session.token_hash, self._link_sessions + session.link_uuid]
        args = _expiring_args(encode_msgpack(session), session.token_hash, session.expires_at)
        with self._available():
            await self._put_expiring(keys=keys, args=args)

    async def get_session(self, token_hash: str) -> LinkSession | None:
        with self._available():
            blob = cast(bytes | None, await self._redis.get(self._session + token_hash))
        session = None if blob is None else _decode_session(blob)
        return session if session is not None and _live(session.expires_at) else None

    async def delete_sessions(self, link_uuid: str) -> int:
        with self._available():
            return int(await self._delete_sessions(keys=[self._link_sessions + link_uuid], args=[self._session]))

    async def put_code(self, code: EmailCode) -> None:
        keys = [f"{self._code}{code.link_uuid}:{code.email}", self._link_codes + code.link_uuid]
        args = _expiring_args(encode_msgpack(code), code.email, code.expires_at)
        with self._available():
            await self._put_expiring(keys=keys, args=args)

    async def get_code(self, link_uuid: str, email: str) -> EmailCode | None:
        with self._available():
            blob = cast(bytes | None, await self._redis.get(f"{self._code}{link_uuid}:{email}"))
        code = None if blob is None else _decode_code(blob)
        return code if code is not None and _live(code.expires_at) else None

    async def delete_code(self, link_uuid: str, email: str) -> None:
        with self._available():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(f"{self._code}{link_uuid}:{email}")
                pipe.zrem(self._link_codes + link_uuid, email)
                await pipe.execute()

    async def close(self) -> None:
        """Close the connection pool; calls after this raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        await self._redis.aclose()

    @contextmanager
    def _available(self) -> Iterator[None]:
        if self._closed:
            raise RuntimeError("the link store is closed")
        with _unavailable():
            yield
