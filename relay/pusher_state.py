"""Pusher channel occupancy and presence across relay instances: a memory driver and a Redis driver.

What the Pusher protocol needs beyond one instance's sockets:

* subscription counts per channel, summed over instances (HTTP API ``channels`` / ``channel_info``);
* presence members per **user id**, not per socket: ``member_added`` goes out only for a user's first
  connection to a channel on any instance, ``member_removed`` only for the last (pusher.md §2.2).

Each instance owns a *share*: per ``(app, channel)`` how many of its sockets are subscribed, and which
users hold at least one presence connection on it, with their member JSON
(``{"user_id": <as given>, "user_info": ...}``). How many sockets of one user an instance holds is
counted locally, so the shared store is written once per user, channel and instance, not per socket.
Readers merge the shares of **live** instances. An instance is live while its heartbeat (every
``ttl_s / 3``) renews its expiry. A dead instance's share is ignored by readers at once (no ghosts),
and the first live instance whose heartbeat notices reaps it: it deletes the share and learns which
members left with it and have no connection anywhere else, which it hands to the ``on_departed``
listeners (the Pusher app sends their ``member_removed``).

Redis layout (``<p>`` = ``{prefix}:pusher:``, ``<ch>`` = ``{app_id}\\n{channel}``):

* ``<p>instances``: sorted set, share id -> expiry (ms, Redis clock, so instance clocks never matter);
  a share id is the instance id plus a random suffix;
* ``<p>{share}:subs``: hash, ``<ch>`` -> subscribed sockets on that instance;
* ``<p>{share}:presence``: set of ``<ch>`` with members on that instance;
* ``<p>{share}:members:<ch>``: hash, user key -> member JSON.

An instance's keys also carry a TTL of ``KEY_TTL_FACTOR * ttl_s`` renewed by its heartbeat: the
last resort when no instance is left to reap them. Every presence decision is one Lua script (atomic,
one round trip); the scripts build key names from a prefix argument, as a standalone Redis allows.
Writes of one instance are serialised (one lock), so a leave and a re-join of one user reach Redis in
the order they happened. When a write failed, or the heartbeat finds its instance gone from
``instances`` (reaped while unreachable, or Redis lost its data), the next heartbeat rewrites the
whole share from the local counts.

Exceptions: :class:`PusherStateError` (reason ``pusher_state_unavailable``) for every Redis failure
of a read, a presence write or ``start``. Subscription-count writes never raise (counts are
informational): a failed one is repaired by the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import redis.asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 15.0
"""An instance whose heartbeat stopped this long ago is dead: its subscriptions and members no longer count."""
KEY_TTL_FACTOR = 20
COMMAND_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0

ChannelKey = tuple[str, str]  # (app id, channel name)
Departed = Callable[[str, str, str], None]
"""``(app_id, channel, member_json)``: a member whose last connection was on an instance that died."""


class PusherStateError(Exception):
    """The shared store did not answer (Redis unreachable, timed out, an error reply)."""

    reason = "pusher_state_unavailable"


class PusherState(Protocol):
    """Occupancy and presence of Pusher channels over every relay instance; see the module docstring."""

    instance_id: str

    async def start(self) -> None:
        """Register this instance (first heartbeat) and keep beating; :class:`PusherStateError` if unreachable."""
        ...

    async def close(self, *, clean: bool = True) -> None:
        """Stop beating; ``clean`` removes this instance's share, else it is left as a crash leaves it."""
        ...

    def on_departed(self, listener: Departed) -> None:
        """Call ``listener`` for every member that left with a dead instance (on the instance that reaps it)."""
        ...

    async def subscribed(self, app_id: str, channel: str, delta: int) -> None:
        """One socket of this instance subscribed (+1) to or left (-1) ``channel``."""
        ...

    async def join(self, app_id: str, channel: str, user_key: str, member: str) -> bool:
        """A presence connection of ``user_key`` on this instance; True when it is the user's first anywhere."""
        ...

    async def leave(self, app_id: str, channel: str, user_key: str) -> str | None:
        """A presence connection ended; the member JSON when it was the user's last anywhere, else None."""
        ...

    async def members(self, app_id: str, channel: str) -> dict[str, str]:
        """Present users of ``channel`` on live instances: user key -> member JSON."""
        ...

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, int]:
        """Occupied channels of the app whose name starts with ``prefix`` -> subscribed sockets (all instances)."""
        ...

    async def subscription_count(self, app_id: str, channel: str) -> int:
        """Subscribed sockets of ``channel`` on live instances."""
        ...


class _Presence:
    """One user's presence connections to one channel on this instance."""

    __slots__ = ("connections", "member")

    def __init__(self, member: str) -> None:
        self.connections = 1
        self.member = member


class _Share:
    """This instance's share (local counts) and the heartbeat; drivers add the shared store (``_join_shared`` ...)."""

    def __init__(self, instance_id: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, not {ttl_s}")
        self.instance_id = instance_id
        self.ttl_s = ttl_s
        self.subs: dict[ChannelKey, int] = {}
        self.users: dict[ChannelKey, dict[str, _Presence]] = {}
        self._listeners: list[Departed] = []
        self._heartbeat: asyncio.Task[None] | None = None

    def on_departed(self, listener: Departed) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._heartbeat is None:
            self._notify(await self._beat())
            self._heartbeat = asyncio.create_task(self._beat_forever(), name=f"pusher-state-{self.instance_id}")

    async def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                self._notify(await self._beat())
            except PusherStateError as exc:
                log.warning("pusher state: heartbeat failed (%s)", exc)
            except Exception:
                log.exception("pusher state: heartbeat failed")

    def _notify(self, departed: list[tuple[str, str, str]]) -> None:
        for app_id, channel, member in departed:
            for listener in self._listeners:
                try:
                    listener(app_id, channel, member)
                except Exception:
                    log.exception("pusher state: departed listener %r failed", listener)

    async def subscribed(self, app_id: str, channel: str, delta: int) -> None:
        key = (app_id, channel)
        count = max(0, self.subs.get(key, 0) + delta)
        if count:
            self.subs[key] = count
        else:
            self.subs.pop(key, None)
        await self._write_subs(key, count)

    async def join(self, app_id: str, channel: str, user_key: str, member: str) -> bool:
        key = (app_id, channel)
        users = self.users.setdefault(key, {})
        presence = users.get(user_key)
        if presence is not None:
            presence.connections += 1
            return False
        presence = users[user_key] = _Presence(member)  # before the await: a concurrent join counts on it
        try:
            return await self._join_shared(key, user_key, member)
        except BaseException:
            self._drop(key, user_key, presence)
            if presence.connections > 0:  # others joined meanwhile: they count on a write that failed
                self._repair_later()
            raise

    async def leave(self, app_id: str, channel: str, user_key: str) -> str | None:
        key = (app_id, channel)
        presence = self.users.get(key, {}).get(user_key)
        if presence is None:
            return None
        self._drop(key, user_key, presence)
        if presence.connections > 0:
            return None
        try:
            last = await self._leave_shared(key, user_key)
        except BaseException:
            self._repair_later()
            raise
        return presence.member if last else None

    def _drop(self, key: ChannelKey, user_key: str, presence: _Presence) -> None:
        presence.connections -= 1
        users = self.users.get(key)
        if presence.connections <= 0 and users is not None and users.get(user_key) is presence:
            del users[user_key]
            if not users:
                del self.users[key]

    # --- what a driver adds ---------------------------------------------------------------------

    async def _beat(self) -> list[tuple[str, str, str]]:
        """Renew this instance's expiry, reap dead instances; the members that departed with them."""
        raise NotImplementedError

    async def _write_subs(self, key: ChannelKey, count: int) -> None:
        raise NotImplementedError

    async def _join_shared(self, key: ChannelKey, user_key: str, member: str) -> bool:
        raise NotImplementedError

    async def _leave_shared(self, key: ChannelKey, user_key: str) -> bool:
        raise NotImplementedError

    def _repair_later(self) -> None:
        """The shared store may disagree with the local counts: rewrite the share at the next heartbeat."""


# --- memory --------------------------------------------------------------------------------------------


class MemoryWorld:
    """What the memory instances of one process share: their shares and expiries (one per relay; tests make more)."""

    def __init__(self) -> None:
        self.expiry: dict[str, float] = {}
        self.shares: dict[str, MemoryPusherState] = {}

    def live(self, own: MemoryPusherState) -> list[MemoryPusherState]:
        """The live shares; ``own`` always counts (a process is alive to itself, even after a long stall)."""
        now = time.monotonic()
        return [s for i, s in self.shares.items() if s is own or self.expiry.get(i, 0.0) > now]


class MemoryPusherState(_Share):
    """The embedded :class:`PusherState`; instances built with the same ``world`` behave like relays on one Redis."""

    def __init__(self, instance_id: str = "local", *, ttl_s: float = DEFAULT_TTL_S, world: MemoryWorld | None = None):
        super().__init__(instance_id, ttl_s)
        self.world = world if world is not None else MemoryWorld()

    async def close(self, *, clean: bool = True) -> None:
        await self._stop_heartbeat()
        if clean and self.world.shares.get(self.instance_id) is self:
            del self.world.shares[self.instance_id]
            self.world.expiry.pop(self.instance_id, None)

    async def _beat(self) -> list[tuple[str, str, str]]:
        world, now = self.world, time.monotonic()
        world.shares[self.instance_id] = self
        world.expiry[self.instance_id] = now + self.ttl_s
        dead = [world.shares.pop(i) for i, expiry in list(world.expiry.items()) if expiry <= now and i in world.shares]
        for share in dead:
            del world.expiry[share.instance_id]
        live = world.live(self)
        departed: dict[tuple[str, str, str], str] = {}
        for share in dead:
            for (app_id, channel), users in share.users.items():
                for user_key, presence in users.items():
                    if not any(user_key in s.users.get((app_id, channel), {}) for s in live):
                        departed[(app_id, channel, user_key)] = presence.member
        return [(app_id, channel, member) for (app_id, channel, _), member in departed.items()]

    async def _write_subs(self, key: ChannelKey, count: int) -> None:
        return None  # the share is the local counts

    def _others_have(self, key: ChannelKey, user_key: str) -> bool:
        return any(user_key in s.users.get(key, {}) for s in self.world.live(self) if s is not self)

    async def _join_shared(self, key: ChannelKey, user_key: str, member: str) -> bool:
        return not self._others_have(key, user_key)

    async def _leave_shared(self, key: ChannelKey, user_key: str) -> bool:
        return not self._others_have(key, user_key)

    async def members(self, app_id: str, channel: str) -> dict[str, str]:
        merged: dict[str, str] = {}
        for share in self.world.live(self):
            for user_key, presence in share.users.get((app_id, channel), {}).items():
                merged.setdefault(user_key, presence.member)
        return merged

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, int]:
        counts: dict[str, int] = {}
        for share in self.world.live(self):
            for (app, channel), count in share.subs.items():
                if app == app_id and channel.startswith(prefix):
                    counts[channel] = counts.get(channel, 0) + count
        return counts

    async def subscription_count(self, app_id: str, channel: str) -> int:
        return sum(share.subs.get((app_id, channel), 0) for share in self.world.live(self))


# --- Redis ---------------------------------------------------------------------------------------------

# Every script: KEYS[1] is the instances sorted set; ``now`` is the Redis clock (ms); live() the live instances.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function live() return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf') end
"""

# ARGV: instance, ttl ms. Returns 1 when the instance was not registered (new, or reaped).
_BEAT = _PRELUDE + "return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])"

# KEYS: instances, own presence set, own members hash; ARGV: instance, <ch>, user key, member, key root, key ttl ms.
# Returns 1 when no other live instance holds the user on this channel (first connection anywhere).
_JOIN = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
for _, inst in ipairs(live()) do
    if inst ~= ARGV[1] and redis.call('HEXISTS', ARGV[5] .. inst .. ':members:' .. ARGV[2], ARGV[3]) == 1 then
        return 0
    end
end
return 1
"""
)

# KEYS and ARGV as _JOIN without member and ttl. Returns 1 when no live instance holds the user any more.
_LEAVE = (
    _PRELUDE
    + """
redis.call('HDEL', KEYS[3], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('SREM', KEYS[2], ARGV[2])
end
for _, inst in ipairs(live()) do
    if redis.call('HEXISTS', ARGV[4] .. inst .. ':members:' .. ARGV[2], ARGV[3]) == 1 then
        return 0
    end
end
return 1
"""
)

# ARGV: key root, key suffix (":subs" or ":members:<ch>"). The flat HGETALL pairs of every live instance's hash.
_GATHER = (
    _PRELUDE
    + """
local out = {}
for _, inst in ipairs(live()) do
    for _, item in ipairs(redis.call('HGETALL', ARGV[1] .. inst .. ARGV[2])) do
        out[#out + 1] = item
    end
end
return out
"""
)

# ARGV: key root, <ch>. The count of one channel on every live instance (nil where it has none).
_SUB_COUNT = (
    _PRELUDE
    + """
local out = {}
for _, inst in ipairs(live()) do
    out[#out + 1] = redis.call('HGET', ARGV[1] .. inst .. ':subs', ARGV[2])
end
return out
"""
)

# ARGV: key root. Removes every dead instance and its keys; returns flat (<ch>, member) pairs of the
# users that were only on dead instances (each once).
_REAP = (
    _PRELUDE
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead == 0 then
    return {}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local alive, out, seen = live(), {}, {}
for _, inst in ipairs(dead) do
    local base = ARGV[1] .. inst
    for _, ch in ipairs(redis.call('SMEMBERS', base .. ':presence')) do
        local key = base .. ':members:' .. ch
        local items = redis.call('HGETALL', key)
        for i = 1, #items, 2 do
            local id = ch .. '\\n' .. items[i]
            local present = seen[id]
            for _, other in ipairs(alive) do
                if present then
                    break
                end
                present = redis.call('HEXISTS', ARGV[1] .. other .. ':members:' .. ch, items[i]) == 1
            end
            if not present then
                out[#out + 1] = ch
                out[#out + 1] = items[i + 1]
            end
            seen[id] = true
        end
        redis.call('DEL', key)
    end
    redis.call('DEL', base .. ':presence', base .. ':subs')
end
return out
"""
)


def _channel_field(key: ChannelKey) -> str:
    return f"{key[0]}\n{key[1]}"


def _split_field(field: bytes) -> ChannelKey:
    app_id, _, channel = field.decode().partition("\n")
    return app_id, channel


@contextlib.contextmanager
def _state_errors(operation: str) -> Iterator[None]:
    """Every way a Redis call fails, as :class:`PusherStateError` (the one place this mapping happens)."""
    try:
        yield
    except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError too
        raise PusherStateError(f"{operation}: {type(exc).__name__}: {exc}") from exc


class RedisPusherState(_Share):
    """The distributed :class:`PusherState` (see the module docstring for keys and scripts)."""

    def __init__(
        self, url: str, prefix: str = "fleetgate", instance_id: str = "local", *, ttl_s: float = DEFAULT_TTL_S
    ) -> None:
        super().__init__(instance_id, ttl_s)
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S
        )
        self._root = f"{prefix}:pusher:"
        self._instances = self._root + "instances"
        # A random suffix keeps two processes apart even when misconfigured with the same instance id.
        self._share = f"{instance_id}:{secrets.token_hex(4)}"
        own = f"{self._root}{self._share}"
        self._subs_key = own + ":subs"
        self._presence_key = own + ":presence"
        self._members_prefix = own + ":members:"
        self._ttl_ms = str(round(ttl_s * 1000))
        self._key_ttl_ms = str(round(ttl_s * 1000 * KEY_TTL_FACTOR))
        self._lock = asyncio.Lock()
        self._repair = False
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (
                ("beat", _BEAT), ("join", _JOIN), ("leave", _LEAVE), ("gather", _GATHER), ("sub_count", _SUB_COUNT),
                ("reap", _REAP),
            )
        }  # fmt: skip

    async def close(self, *, clean: bool = True) -> None:
        await self._stop_heartbeat()
        if clean:
            try:
                async with self._lock:
                    with _state_errors("close"):
                        await self._delete_share(self._redis.pipeline(transaction=True), deregister=True).execute()
            except PusherStateError as exc:
                log.warning("pusher state: could not remove this instance's share (%s); it expires", exc)
        await self._redis.aclose()

    def _repair_later(self) -> None:
        self._repair = True

    async def _run(self, name: str, operation: str, keys: list[str], args: list[Any]) -> Any:
        with _state_errors(operation):
            return await self._scripts[name](keys=keys, args=args)

    async def _beat(self) -> list[tuple[str, str, str]]:
        async with self._lock:
            new = await self._run("beat", "heartbeat", [self._instances], [self._share, self._ttl_ms])
            if new or self._repair:
                await self._rewrite_share()
            else:
                with _state_errors("heartbeat"):
                    pipe = self._redis.pipeline(transaction=False)
                    for key in self._own_keys():
                        pipe.pexpire(key, int(self._key_ttl_ms))
                    await pipe.execute()
        flat = await self._run("reap", "reap", [self._instances], [self._root])
        return [(*_split_field(ch), member.decode()) for ch, member in zip(flat[::2], flat[1::2], strict=True)]

    def _own_keys(self) -> list[str]:
        return [self._subs_key, self._presence_key] + [self._members_prefix + _channel_field(k) for k in self.users]

    def _delete_share(self, pipe: Any, *, deregister: bool) -> Any:
        pipe.eval(
            "for _, ch in ipairs(redis.call('SMEMBERS', KEYS[1])) do redis.call('DEL', ARGV[1] .. ch) end",
            1, self._presence_key, self._members_prefix,
        )  # fmt: skip
        pipe.delete(self._subs_key, self._presence_key)
        if deregister:
            pipe.zrem(self._instances, self._share)
        return pipe

    async def _rewrite_share(self) -> None:
        """Replace this instance's keys with the local counts (caller holds the lock)."""
        with _state_errors("rewrite share"):
            pipe = self._delete_share(self._redis.pipeline(transaction=True), deregister=False)
            if self.subs:
                pipe.hset(self._subs_key, mapping={_channel_field(k): n for k, n in self.subs.items()})
            for key, users in self.users.items():
                field = _channel_field(key)
                pipe.hset(self._members_prefix + field, mapping={u: p.member for u, p in users.items()})
                pipe.sadd(self._presence_key, field)
            for own in self._own_keys():
                pipe.pexpire(own, int(self._key_ttl_ms))
            await pipe.execute()
        self._repair = False

    async def _write_subs(self, key: ChannelKey, count: int) -> None:
        field = _channel_field(key)
        try:
            async with self._lock:
                with _state_errors("subscription count"):
                    pipe = self._redis.pipeline(transaction=True)
                    if count:
                        pipe.hset(self._subs_key, field, count)
                        pipe.pexpire(self._subs_key, int(self._key_ttl_ms))
                    else:
                        pipe.hdel(self._subs_key, field)
                    await pipe.execute()
        except PusherStateError as exc:
            log.warning("pusher state: %s; repaired at the next heartbeat", exc)
            self._repair = True

    def _presence_keys(self, key: ChannelKey) -> tuple[list[str], str]:
        field = _channel_field(key)
        return [self._instances, self._presence_key, self._members_prefix + field], field

    async def _join_shared(self, key: ChannelKey, user_key: str, member: str) -> bool:
        keys, field = self._presence_keys(key)
        args = [self._share, field, user_key, member, self._root, self._key_ttl_ms]
        async with self._lock:
            return bool(await self._run("join", "presence join", keys, args))

    async def _leave_shared(self, key: ChannelKey, user_key: str) -> bool:
        keys, field = self._presence_keys(key)
        async with self._lock:
            return bool(await self._run("leave", "presence leave", keys, [self._share, field, user_key, self._root]))

    async def members(self, app_id: str, channel: str) -> dict[str, str]:
        suffix = ":members:" + _channel_field((app_id, channel))
        flat = await self._run("gather", "members", [self._instances], [self._root, suffix])
        merged: dict[str, str] = {}
        for user_key, member in zip(flat[::2], flat[1::2], strict=True):
            merged.setdefault(user_key.decode(), member.decode())
        return merged

    async def _all_subs(self) -> Iterator[tuple[ChannelKey, int]]:
        flat = await self._run("gather", "subscription counts", [self._instances], [self._root, ":subs"])
        return ((_split_field(field), int(count)) for field, count in zip(flat[::2], flat[1::2], strict=True))

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, int]:
        counts: dict[str, int] = {}
        for (app, channel), count in await self._all_subs():
            if app == app_id and channel.startswith(prefix) and count > 0:
                counts[channel] = counts.get(channel, 0) + count
        return counts

    async def subscription_count(self, app_id: str, channel: str) -> int:
        field = _channel_field((app_id, channel))
        counts = await self._run("sub_count", "subscription count", [self._instances], [self._root, field])
        return sum(int(count) for count in counts if count is not None)


def open_pusher_state(
    driver: str, redis_url: str = "", prefix: str = "fleetgate", instance_id: str = "local"
) -> PusherState:
    """The :class:`PusherState` driver ``driver`` names (``memory`` or ``redis``); ``start`` it before use."""
    if driver == "redis":
        return RedisPusherState(redis_url, prefix, instance_id)
    if driver == "memory":
        return MemoryPusherState(instance_id)
    raise ValueError(f"unknown pusher state driver {driver!r} (memory, redis)")
