"""The Redis state store (distributed mode): every gateway and relay sees the same registry and last positions.

Keys, under ``{prefix}:state:``:

* ``devices``                  hash  IMEI -> msgpack ``Device``
* ``device-company``           hash  IMEI -> company id (where the device is indexed)
* ``company-devices:{company}`` sorted set of IMEIs, all score 0, so ranges come in IMEI order
* ``last:{company}``           hash  asset id -> msgpack ``TrackedPosition``
* ``last-fix``                 hash  asset id -> fix time (ms since the epoch) of the record kept
* ``last-company``             hash  asset id -> company id (which ``last:`` hash holds the asset)

Every write that must compare or move things is one Lua script, so it is
atomic and one round trip, with no WATCH retries: a whole batch of last
positions is one script call. The scripts build the ``company-devices:`` and
``last:`` key of a company from a prefix argument, as a standalone Redis
allows (a Redis Cluster would need one hash tag for all the keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import msgspec
import redis.asyncio as aioredis

from gateway.records import Device, TrackedPosition, decode_position, encode_msgpack
from gateway.settings import StateSettings
from gateway.state import fix_time_ms

_decode_device = msgspec.msgpack.Decoder(Device).decode

# KEYS: devices, device-company, company-devices:{new company}
# ARGV: imei, record, company, "company-devices:" key prefix
_PUT_DEVICE = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old and old ~= ARGV[3] then
    redis.call('ZREM', ARGV[4] .. old, ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
"""

# KEYS: devices, device-company; ARGV: imei, "company-devices:" key prefix. Returns 1 if it existed.
_REMOVE_DEVICE = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
    redis.call('ZREM', ARGV[2] .. old, ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: last-fix, last-company; ARGV: "last:" key prefix, then (asset, company, fix ms, record) per record.
# Records apply in order, each against what the previous ones left: the newest of a batch wins whatever
# the order, and of equal fix times the later one (">=", as in the SQLite driver). An asset whose
# company changed moves to the new company's hash.
_SAVE_LAST_POSITIONS = """
for i = 2, #ARGV, 4 do
    local asset, company, fix = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local kept = redis.call('HGET', KEYS[1], asset)
    if not kept or tonumber(fix) >= tonumber(kept) then
        local old_company = redis.call('HGET', KEYS[2], asset)
        if old_company and old_company ~= company then
            redis.call('HDEL', ARGV[1] .. old_company, asset)
        end
        redis.call('HSET', KEYS[1], asset, fix)
        redis.call('HSET', KEYS[2], asset, company)
        redis.call('HSET', ARGV[1] .. company, asset, ARGV[i + 3])
    end
end
"""

# KEYS: last-company; ARGV: asset, "last:" key prefix.
_LAST_POSITION = """
local company = redis.call('HGET', KEYS[1], ARGV[1])
if not company then
    return false
end
return redis.call('HGET', ARGV[2] .. company, ARGV[1])
"""


class RedisStateStore:
    """:class:`gateway.state.base.StateStore` on ``settings.redis_url``, keys under ``settings.prefix``."""

    def __init__(self, settings: StateSettings) -> None:
        # Blocking pool: a login storm waits for a connection rather than failing at the pool's cap.
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=64, timeout=5.0)
        self._redis = aioredis.Redis.from_pool(pool)
        root = f"{settings.prefix}:state:"
        self._devices = root + "devices"
        self._device_company = root + "device-company"
        self._company_devices = root + "company-devices:"
        self._last = root + "last:"
        self._last_fix = root + "last-fix"
        self._last_company = root + "last-company"
        self._put_device = self._redis.register_script(_PUT_DEVICE)
        self._remove_device = self._redis.register_script(_REMOVE_DEVICE)
        self._save_last_positions = self._redis.register_script(_SAVE_LAST_POSITIONS)
        self._last_position = self._redis.register_script(_LAST_POSITION)

    async def get_device(self, imei: str) -> Device | None:
        blob = cast(bytes | None, await self._redis.hget(self._devices, imei))
        return None if blob is None else _decode_device(blob)

    async def put_device(self, device: Device) -> None:
        keys = [self._devices, self._device_company, self._company_devices + device.company_id]
        args: list[str | bytes] = [device.imei, encode_msgpack(device), device.company_id, self._company_devices]
        await self._put_device(keys=keys, args=args)

    async def remove_device(self, imei: str) -> bool:
        keys = [self._devices, self._device_company]
        return bool(await self._remove_device(keys=keys, args=[imei, self._company_devices]))

    async def list_devices(self, company_id: str | None = None) -> list[Device]:
        if company_id is None:
            by_imei = cast(dict[bytes, bytes], await self._redis.hgetall(self._devices))
            return [_decode_device(by_imei[imei]) for imei in sorted(by_imei)]
        imeis = cast(list[bytes], await self._redis.zrange(self._company_devices + company_id, 0, -1))
        if not imeis:
            return []
        blobs = cast(list[bytes | None], await self._redis.hmget(self._devices, imeis))
        return [_decode_device(blob) for blob in blobs if blob is not None]  # None: removed in between

    async def save_last_positions(self, records: Sequence[TrackedPosition]) -> None:
        if not records:
            return
        args: list[str | int | bytes] = [self._last]
        for r in records:
            args += (r.asset_id, r.company_id, fix_time_ms(r.fix_time), encode_msgpack(r))
        await self._save_last_positions(keys=[self._last_fix, self._last_company], args=args)

    async def last_position(self, asset_id: str) -> TrackedPosition | None:
        blob = cast(bytes | None, await self._last_position(keys=[self._last_company], args=[asset_id, self._last]))
        return None if blob is None else decode_position(blob)

    async def last_positions(self, company_id: str) -> list[TrackedPosition]:
        by_asset = cast(dict[bytes, bytes], await self._redis.hgetall(self._last + company_id))
        # Byte order of UTF-8 is code point order: the same order as SQLite's and Python's.
        return [decode_position(by_asset[asset]) for asset in sorted(by_asset)]

    async def close(self) -> None:
        await self._redis.aclose()
