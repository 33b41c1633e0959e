"""The Pusher protocol (7; 5 and 6 too) at ``/app/{key}``: stock pusher-js, Laravel Echo and pysher clients.

Wire rules follow ``/work/shared/pusher.md`` (section numbers below refer to it); the pure pieces
(channel rules, message encoding, ``location.updated`` payloads) are in :mod:`relay.pusher_channels`,
occupancy and presence over every relay instance in :mod:`relay.pusher_state`.

Channels (hub keys ``p:{app_id}:{channel}``, so apps never share a channel):

* ``private-account.{company}``: ``location.updated`` for every asset of the account, ``alert.triggered``;
* ``private-asset.{asset_id}``: the same for one asset;
* ``presence-account.{company}``: who is watching; any other public, ``private-``, ``presence-`` or
  ``private-encrypted-`` channel works for the HTTP API and client events;
* ``private-tracking-link.{uuid}``: a public tracking link's viewers, admitted (after the signature
  check) and fed by :class:`relay.links.channel.LinkChannels` when the relay serves tracking links
  (:meth:`PusherHub.attach_links`); refusals there close the socket with 4001-4005. No client events.

Tenancy: records reach only ``private-`` channels named from the record's own company and asset, and a
socket joins a private channel only with a signature over its socket id and the channel name, which
``/broadcasting/auth`` issues after checking the bearer token's company. The relay re-checks every
signature, and closes sockets whose token was revoked (4009) (:meth:`PusherHub.note_grant`).

Location batching: records of one channel within ``batch_window_ms`` go out as one event, the JSON
object for a single record, else a JSON array split so that each event's data stays within
``max_message`` bytes; each event is encoded once per channel and its frame written to every member.

Codes chosen (§1.4: 4000 is never used; 4001-4099 and 4300+ stop pusher-js for good):

* unknown app key: ``pusher:error`` 4001, close 4001; no ``protocol`` parameter: 4008; a protocol
  other than 5, 6, 7: 4007; the app's connection cap on this instance: 4004 (a quota, as the issue
  asks; instance overload is refused earlier, by the WebSocket server, with HTTP 503); more sockets
  from one IP address than ``[links] ws_connections_per_ip``: 4100 (pusher-js retries after 1 s);
* a revoked token, or :meth:`PusherHub.terminate_user`: ``pusher:error`` 4009, close 4009;
* silence: the WebSocket server pings and closes an unanswered socket with 4201 (reconnect at once);
* a client message over ``max_message`` (10 KB): close 1009 by the WebSocket layer (pusher-js
  reconnects after 1 s). Only a broken client sends one; reading it first would need a larger buffer;
* failed channel auth: channel-scoped ``pusher:subscription_error`` ``{"type": "AuthError", "status":
  401}``, socket open (§2.1). A bad channel name: the same with ``"InvalidChannel"``/400 (also a
  ``#server-to-user-`` channel: no ``pusher:signin`` here, 403). The presence store unreachable:
  ``"ServerError"``/503;
* client events: over the rate (``max_client_events_per_s``): ``pusher:error`` 4301, event dropped,
  socket open (§2.4); disabled for the app, on a public or encrypted channel, or on a channel the
  socket has not joined: ``pusher:error`` with ``code: null`` (what the official service sends for
  rejected client events: not a connection fault, so no code that would make a client act);
* a message the relay does not understand: ``pusher:error`` ``code: null``, socket open.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
from websockets.http11 import Request

from gateway.state.base import StateStore
from relay import metrics
from relay import pusher_channels as wire
from relay.control import Control, ControlError, ControlMessage
from relay.hub import Hub
from relay.pusher_auth import app_secret
from relay.pusher_state import PusherState, PusherStateError
from relay.settings import PusherAppSettings, PusherSettings
from relay.wsserver import Inbox, WsConnection

if TYPE_CHECKING:
    from relay.links.channel import LinkChannels

log = logging.getLogger(__name__)

CODE_APP_UNKNOWN = 4001
CODE_OVER_QUOTA = 4004
CODE_UNSUPPORTED_PROTOCOL = 4007
CODE_NO_PROTOCOL = 4008
CODE_UNAUTHORIZED = 4009
CODE_OVER_CAPACITY = 4100
CODE_PONG_TIMEOUT = 4201
CODE_CLIENT_EVENT_RATE = 4301
PROTOCOLS = frozenset({5, 6, 7})
CLOSE_TASKS_TIMEOUT_S = 2.0

# Control hints (relay.control): every instance, the sender included, applies them to its own sockets.
HINT_EVENT = "pusher_event"  # {"app", "channels", "event", "json": data as JSON text, "except", "user_id"}
HINT_PRESENCE = "pusher_presence"  # same shape, for member_added / member_removed
HINT_GRANT = "pusher_grant"  # {"socket_id", "jti", "user"}
HINT_TERMINATE = "pusher_terminate"  # {"app", "user"}


class PusherHub:
    """The WebSocket app for ``/app/{key}``; also the API of the HTTP half (``relay.pusher_http``)."""

    name = "pusher"
    ping_timeout_code = CODE_PONG_TIMEOUT

    def __init__(
        self,
        settings: PusherSettings,
        auth_secret: str,
        hub: Hub,
        store: StateStore,
        control: Control,
        state: PusherState,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.auth_secret = auth_secret
        self.hub = hub
        self.store = store
        self.control = control
        self.state = state
        self.instance_id = instance_id
        self.max_message = settings.max_message
        # Quiet sockets get a ping frame (the relay sets the interval: [relay] ping_interval_s); no pong: 4201.
        self.ping_interval_s, self.ping_timeout_s = float(max(1, settings.activity_timeout_s)), settings.pong_timeout_s
        self.apps_by_key = {app.key: app for app in reversed(settings.apps)}
        self.apps_by_id = {app.id: app for app in reversed(settings.apps)}
        self.secrets = {app.id: app_secret(app, auth_secret) for app in settings.apps}
        self.sessions: dict[str, PusherSession] = {}  # socket id -> session, live sockets of this instance
        self.app_connections: collections.Counter[str] = collections.Counter()
        self.by_user: dict[tuple[str, str], set[PusherSession]] = {}  # (app id, user key) -> sessions
        self.by_jti: dict[str, set[PusherSession]] = {}  # channel grants by token id (note_grant)
        self.links: LinkChannels | None = None  # private-tracking-link.* channels (attach_links)
        self.max_connections_per_ip = 0  # 0: no cap (attach_links sets [links] ws_connections_per_ip)
        self.ip_connections: collections.Counter[str] = collections.Counter()
        self.fanout = wire.Fanout(hub, list(self.apps_by_id), settings.batch_window_ms, settings.max_message)
        self._tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self._control_handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "revoke": self._on_revoke,
            HINT_EVENT: self._on_event,
            HINT_PRESENCE: self._on_event,
            HINT_GRANT: self._on_grant,
            HINT_TERMINATE: self._on_terminate,
        }
        hub.handlers.append(self.fanout.on_record)
        control.add_listener(self.on_control)
        state.on_departed(self._on_departed)

    async def start(self) -> None:
        await self.state.start()

    async def close(self) -> None:
        """After the WebSocket server closed: finish the sockets' presence clean-up, then leave the state store."""
        self.fanout.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_TASKS_TIMEOUT_S)
        await self.state.close()

    def attach_links(self, links: LinkChannels, max_connections_per_ip: int) -> None:
        """Serve ``private-tracking-link.*`` channels through ``links``, and cap the sockets per IP address."""
        self.links = links
        self.max_connections_per_ip = max_connections_per_ip

    # --- wsserver.App -------------------------------------------------------------------------------

    def match(self, path: str) -> bool:
        return path.startswith("/app/")

    def open(self, conn: WsConnection, request: Request) -> PusherSession:
        return PusherSession(self, conn, request.path)

    # --- lookups for the HTTP half --------------------------------------------------------------------

    def app_by_id(self, app_id: str) -> PusherAppSettings | None:
        return self.apps_by_id.get(app_id)

    def app_by_key(self, key: str) -> PusherAppSettings | None:
        return self.apps_by_key.get(key)

    def secret_of(self, app: PusherAppSettings) -> str:
        secret = self.secrets.get(app.id)
        return secret if secret is not None else app_secret(app, self.auth_secret)

    def new_socket_id(self) -> str:
        """Two random unsigned integers joined by a dot (§1.2: ``^\\d+\\.\\d+$``), unique among live sockets."""
        while True:
            socket_id = f"{secrets.randbelow(10**10)}.{secrets.randbelow(10**10)}"
            if socket_id not in self.sessions:
                return socket_id

    # --- HTTP API operations (every instance) ----------------------------------------------------------

    async def trigger(
        self, app_id: str, channels: Sequence[str], event: str, data: str, *, socket_id: str | None = None
    ) -> None:
        """Deliver ``data`` (the publisher's string, as is) on ``channels`` on every instance, except ``socket_id``.

        Raises :class:`relay.control.ControlError` when the hint could not be sent."""
        hint = {"app": app_id, "channels": list(channels), "event": event, "json": wire.as_json_string(data.encode())}
        hint["except"] = socket_id or ""
        await self.control.publish(ControlMessage(kind=HINT_EVENT, data=_text_values(hint)))

    async def channels(self, app_id: str, prefix: str = "") -> dict[str, int]:
        """Occupied channels of the app (all instances) -> subscription count; :class:`PusherStateError`."""
        return await self.state.channels(app_id, prefix)

    async def channel_info(self, app_id: str, channel: str) -> dict[str, Any]:
        count = await self.state.subscription_count(app_id, channel)
        info: dict[str, Any] = {"occupied": count > 0, "subscription_count": count}
        if wire.channel_kind(channel) == wire.PRESENCE:
            info["user_count"] = len(await self.state.members(app_id, channel))
        return info

    async def users(self, app_id: str, channel: str) -> list[str]:
        """The user ids (string form) present on a presence channel, all instances."""
        return sorted(await self.state.members(app_id, channel))

    async def terminate_user(self, app_id: str, user_id: str) -> None:
        """Close every socket of ``user_id`` (a presence member, or the user of a grant) on every instance:
        ``pusher:error`` + close 4009."""
        await self.control.publish(ControlMessage(kind=HINT_TERMINATE, data={"app": app_id, "user": str(user_id)}))

    def note_grant(self, socket_id: str, jti: str, *, user_id: str | None = None) -> None:
        """Remember that ``socket_id`` was authorised with token ``jti`` (of user ``user_id``, for
        :meth:`terminate_user`): revoking the token closes the socket (4009). The socket may be on
        another instance, so the grant is broadcast unless it is local."""
        grant = {"socket_id": socket_id, "jti": jti, "user": user_id or ""}
        if socket_id in self.sessions:
            self._on_grant(grant)
        else:
            self.spawn(self.publish_hint(ControlMessage(kind=HINT_GRANT, data=grant)))

    def publish_alert(self, company_id: str, asset_id: str, alert: dict[str, Any]) -> None:
        """``alert.triggered`` on ``private-account.{company}`` and ``private-asset.{asset}`` of every app.

        Local delivery, like records: call it on every instance (each reads the bus)."""
        self.fanout.alert(company_id, asset_id, _encode(alert))

    # --- control hints -----------------------------------------------------------------------------------

    def on_control(self, message: ControlMessage) -> None:
        handler = self._control_handlers.get(message.kind)
        if handler is not None:
            handler(message.data)

    def _on_event(self, hint: dict[str, Any]) -> None:
        app_id, data_json = str(hint["app"]), str(hint["json"]).encode()
        user_id, skip = hint.get("user_id"), self.sessions.get(str(hint.get("except") or ""))
        for channel in hint["channels"]:
            self.fanout.deliver(
                app_id, str(channel), str(hint["event"]), data_json, skip=skip.conn if skip is not None else None,
                user_id_json=str(user_id).encode() if user_id else None, type_=str(hint.get("type", "event")),
            )  # fmt: skip
        self.hub.server.schedule_flush()

    def _on_revoke(self, data: dict[str, Any]) -> None:
        for session in list(self.by_jti.pop(str(data.get("jti")), ())):
            session.refuse(CODE_UNAUTHORIZED, "Connection is unauthorized: token revoked", "revoked")

    def _on_grant(self, data: dict[str, Any]) -> None:
        session = self.sessions.get(str(data.get("socket_id")))
        if session is None or session.app is None:
            return  # on another instance, or gone
        jti, user = str(data.get("jti")), str(data.get("user") or "")
        if self.control.is_revoked(jti):  # the revocation overtook the grant
            session.refuse(CODE_UNAUTHORIZED, "Connection is unauthorized: token revoked", "revoked")
            return
        self.by_jti.setdefault(jti, set()).add(session)
        session.jtis.add(jti)
        if user:
            session.users.add(user)
            self.by_user.setdefault((session.app.id, user), set()).add(session)

    def _on_terminate(self, data: dict[str, Any]) -> None:
        for session in list(self.by_user.get((str(data.get("app")), str(data.get("user"))), ())):
            session.refuse(CODE_UNAUTHORIZED, "Connection terminated by the application", "terminated")

    def _on_departed(self, app_id: str, channel: str, member: str) -> None:
        """A member whose last connection was on a relay instance that died: tell the survivors."""
        self.spawn(self.publish_member(app_id, channel, "pusher_internal:member_removed", member))

    async def publish_member(self, app_id: str, channel: str, event: str, member: str, except_socket: str = "") -> None:
        """member_added / member_removed to the channel's subscribers on every instance."""
        data = member if event == "pusher_internal:member_added" else wire.member_removed_data(member)
        hint = {"app": app_id, "channels": [channel], "event": event, "json": wire.as_json_string(data.encode())}
        hint["except"] = except_socket
        await self.publish_hint(ControlMessage(kind=HINT_PRESENCE, data=_text_values(hint)))

    async def publish_hint(self, message: ControlMessage) -> None:
        try:
            await self.control.publish(message)
        except ControlError as exc:
            log.warning("pusher: %s hint not sent (%s)", message.kind, exc)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run background work of a closed socket or a hint; kept referenced, awaited by :meth:`close`."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pusher: background task failed", exc_info=task.exception())


_encode = msgspec.json.Encoder().encode


def _text_values(hint: dict[str, Any]) -> dict[str, Any]:
    """JSON texts travel as str in control messages (msgpack keeps them apart from binary)."""
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in hint.items()}


class PusherSession:
    """One socket: ``pusher:connection_established`` first, then messages in order, one at a time.

    Messages are handled by a task that exists only while messages wait; reading pauses when too
    many wait (as in :mod:`relay.native`)."""

    def __init__(self, hub: PusherHub, conn: WsConnection, path: str) -> None:
        self.hub = hub
        self.conn = conn
        self.path = path
        self.app: PusherAppSettings | None = None
        self.socket_id = ""
        self.channels: dict[str, wire.Membership | None] = {}  # subscribed (settled) channel -> presence membership
        self.jtis: set[str] = set()  # tokens that authorised channels of this socket (note_grant)
        self.users: set[str] = set()  # user ids of those tokens
        self._pending: set[str] = set()  # joined to the hub, state being written
        self._client_events: collections.deque[float] = collections.deque()
        self.inbox = Inbox(conn, self._handle)
        self._started = False
        self._closed = False
        # After the handshake response is written: the protocol object accepts messages only then.
        hub.loop.call_soon(self._establish)

    def _establish(self) -> None:
        if self._started or self._closed:
            return
        self._started = True
        url = urlsplit(self.path)
        key = unquote(url.path[len("/app/") :])
        app = self.hub.app_by_key(key)
        if app is None:
            self.refuse(CODE_APP_UNKNOWN, f"App key {key[:64]} does not exist.", "unknown_app")
            return
        protocol = parse_qs(url.query).get("protocol", [""])[0]
        if not protocol:
            self.refuse(CODE_NO_PROTOCOL, "No protocol version supplied", "protocol")
            return
        if not protocol.isdigit() or int(protocol) not in PROTOCOLS:
            self.refuse(CODE_UNSUPPORTED_PROTOCOL, f"Unsupported protocol version {protocol[:16]}", "protocol")
            return
        hub = self.hub
        per_ip = hub.max_connections_per_ip
        if per_ip and hub.ip_connections[self.conn.peer_ip] >= per_ip:
            self.refuse(CODE_OVER_CAPACITY, "Over capacity: too many connections from this address", "limit_ip")
            return
        if hub.app_connections[app.id] >= app.max_connections:
            self.refuse(CODE_OVER_QUOTA, "Application is over connection quota", "limit_reached")
            return
        self.app = app
        self.socket_id = hub.new_socket_id()
        hub.sessions[self.socket_id] = self
        hub.app_connections[app.id] += 1
        hub.ip_connections[self.conn.peer_ip] += 1
        # Never 0: pusher-js refuses a handshake without an activity timeout (§1.2).
        self.conn.send_text(wire.connection_established(self.socket_id, max(1, hub.settings.activity_timeout_s)))

    # --- wsserver.Session ----------------------------------------------------------------------------

    def on_text(self, data: bytes) -> None:
        self._establish()
        if self.app is None or not self.conn.open:
            return
        self.inbox.put(data)

    def on_binary(self, data: bytes) -> None:
        if self.app is not None:
            self.error(None, "Invalid message: expected a JSON text frame")

    def on_close(self) -> None:
        self._closed = True
        self.inbox.clear()
        app, hub = self.app, self.hub
        if app is None:
            return
        if hub.sessions.get(self.socket_id) is self:
            del hub.sessions[self.socket_id]
        hub.app_connections[app.id] -= 1
        if hub.app_connections[app.id] <= 0:
            del hub.app_connections[app.id]
        hub.ip_connections[self.conn.peer_ip] -= 1
        if hub.ip_connections[self.conn.peer_ip] <= 0:
            del hub.ip_connections[self.conn.peer_ip]
        if hub.links is not None:
            hub.links.forget(self)
        for jti in self.jtis:
            sessions = hub.by_jti.get(jti)
            if sessions is not None:
                sessions.discard(self)
                if not sessions:
                    del hub.by_jti[jti]
        for channel in (*self.channels, *self._pending):
            hub.hub.leave(wire.hub_key(app.id, channel), self.conn)
        channels, self.channels = self.channels, {}
        users, self.users = {p.user_key for p in channels.values() if p is not None} | self.users, set()
        for user in users:
            self._forget_user(user)
        if channels:
            hub.spawn(self._release(app.id, channels))

    # --- messages --------------------------------------------------------------------------------------

    async def _handle(self, data: bytes) -> None:
        try:
            message = wire.decode_message(data)
        except msgspec.DecodeError:
            metrics.MESSAGES_IN.labels(protocol="pusher", type="invalid").inc()
            self.error(None, 'Invalid message: expected a JSON object with an "event" string')
            return
        event = message.event
        if event.startswith("client-"):
            metrics.MESSAGES_IN.labels(protocol="pusher", type="client_event").inc()
            await self._client_event(message)
            return
        handler = _HANDLERS.get(event)
        metrics.MESSAGES_IN.labels(protocol="pusher", type=event[7:] if handler else "unknown").inc()
        if handler is None:
            self.error(None, f"Unsupported event {event[:64]!r}")
            return
        await handler(self, message)

    async def _ping(self, message: wire.ClientMessage) -> None:
        self.conn.send_text(wire.PONG)

    async def _pong(self, message: wire.ClientMessage) -> None:
        return None  # activity only (any message is)

    async def _signin(self, message: wire.ClientMessage) -> None:
        self.error(None, "pusher:signin is not supported by this server")

    async def _subscribe(self, message: wire.ClientMessage) -> None:
        try:
            request = wire.decode_subscribe(message.data)
        except (msgspec.DecodeError, UnicodeError):
            self.error(None, 'pusher:subscribe needs data {"channel": ..., "auth"?: ..., "channel_data"?: ...}')
            return
        channel = request.channel
        assert self.app is not None
        try:
            presence = wire.authorise(request, self.app.key, self.hub.secret_of(self.app), self.socket_id)
        except wire.SubscriptionRefused as refused:
            if refused.status == 401:
                metrics.AUTH_FAILURES.labels(reason="pusher_signature").inc()
            self._subscription_error(channel, refused.kind, refused.message, refused.status)
            return
        held: list[bytes] = []  # events that wait until subscription_succeeded is out
        if wire.is_tracking_link(channel):
            admitted = await self.hub.links.admit(self, channel) if self.hub.links is not None else None
            if admitted is None:  # refused: the socket is closing (4001-4005), or a subscription error
                if self.hub.links is None:
                    self._subscription_error(channel, "InvalidChannel", "tracking links are not served here", 404)
                return
            held += admitted  # the link's current position
        if channel in self.channels:  # already subscribed: succeed again (§2.1)
            membership = self.channels[channel]
            try:
                data = "{}" if membership is None else await self._presence_data(self.app.id, channel, membership)
            except PusherStateError:
                self._subscription_error(channel, "ServerError", "presence is unavailable, try again", 503)
                return
            self.conn.send_text(wire.subscription_succeeded(channel, data))
            return
        conn = self.conn
        conn.hold = held
        try:
            await self._join(channel, presence)
        finally:
            conn.hold = None
            for frame in held:
                conn.push(frame)
            self.hub.hub.server.schedule_flush()

    async def _join(self, channel: str, presence: wire.Membership | None) -> None:
        hub, app = self.hub, self.app
        assert app is not None
        hub.hub.join(wire.hub_key(app.id, channel), self.conn)
        self._pending.add(channel)
        await hub.state.subscribed(app.id, channel, 1)
        first, data, joined = False, "{}", False
        try:
            if presence is not None:
                first = await hub.state.join(app.id, channel, presence.user_key, presence.member)
                joined = True
                data = await self._presence_data(app.id, channel, presence)
        except PusherStateError as exc:
            log.warning("pusher: presence subscription failed (%s)", exc)
            self._pending.discard(channel)
            hub.hub.leave(wire.hub_key(app.id, channel), self.conn)
            hub.spawn(self._release(app.id, {channel: presence if joined else None}))
            self._subscription_error(channel, "ServerError", "presence is unavailable, try again", 503)
            return
        self._pending.discard(channel)
        if self._closed:  # gone while the state was written: on_close did not see this channel
            hub.spawn(self._release(app.id, {channel: presence}))
            return
        self.channels[channel] = presence
        self.conn.send_text(wire.subscription_succeeded(channel, data))
        if presence is not None:
            hub.by_user.setdefault((app.id, presence.user_key), set()).add(self)
            if first:
                added = "pusher_internal:member_added"
                hub.spawn(hub.publish_member(app.id, channel, added, presence.member, self.socket_id))

    async def _presence_data(self, app_id: str, channel: str, presence: wire.Membership) -> str:
        members = await self.hub.state.members(app_id, channel)
        members.setdefault(presence.user_key, presence.member)
        return wire.presence_data(members)

    async def _unsubscribe(self, message: wire.ClientMessage) -> None:
        try:
            channel = wire.decode_subscribe(message.data).channel
        except (msgspec.DecodeError, UnicodeError):
            self.error(None, 'pusher:unsubscribe needs data {"channel": ...}')
            return
        if channel not in self.channels or self.app is None:
            return  # no reply, subscribed or not (§2 table)
        presence = self.channels.pop(channel)
        self.hub.hub.leave(wire.hub_key(self.app.id, channel), self.conn)
        if self.hub.links is not None and wire.is_tracking_link(channel):
            self.hub.links.forget(self, channel)
        if presence is not None:
            self._forget_user(presence.user_key)
        await self._release(self.app.id, {channel: presence})

    async def _release(self, app_id: str, channels: dict[str, wire.Membership | None]) -> None:
        """Take this socket's subscriptions out of the state store; member_removed for a user's last connection."""
        state = self.hub.state
        for channel, presence in channels.items():
            await state.subscribed(app_id, channel, -1)
            if presence is None:
                continue
            try:
                member = await state.leave(app_id, channel, presence.user_key)
            except PusherStateError as exc:
                log.warning("pusher: presence leave not recorded (%s); repaired by the heartbeat", exc)
                continue
            if member is not None:
                await self.hub.publish_member(app_id, channel, "pusher_internal:member_removed", member)

    def _forget_user(self, user_key: str) -> None:
        if self.app is None or user_key in self.users:
            return
        if any(p is not None and p.user_key == user_key for p in self.channels.values()):
            return
        sessions = self.hub.by_user.get((self.app.id, user_key))
        if sessions is not None:
            sessions.discard(self)
            if not sessions:
                del self.hub.by_user[(self.app.id, user_key)]

    async def _client_event(self, message: wire.ClientMessage) -> None:
        """``client-*`` (§2.4): enabled apps only, private/presence channels this socket joined, 10/s, not echoed."""
        app, channel = self.app, message.channel
        assert app is not None
        if not app.enable_client_messages:
            self.error(None, "Client events are not enabled for this app")
            return
        if channel is None or channel not in self.channels:
            self.error(None, "Client event rejected - you must be subscribed to the channel")
            return
        if wire.channel_kind(channel) not in (wire.PRIVATE, wire.PRESENCE):
            self.error(None, "Client event rejected - only supported on private and presence channels")
            return
        if wire.is_tracking_link(channel):  # viewers of a public link do not talk to each other
            self.error(None, "Client event rejected - not supported on tracking link channels")
            return
        if len(message.event) > wire.MAX_EVENT_NAME:
            self.error(None, f"Client event rejected - event names have at most {wire.MAX_EVENT_NAME} characters")
            return
        now, sent = time.monotonic(), self._client_events
        while sent and now - sent[0] >= 1.0:
            sent.popleft()
        if len(sent) >= app.max_client_events_per_s:
            self.error(CODE_CLIENT_EVENT_RATE, "Client event rejected - rate limit exceeded")
            return
        sent.append(now)
        presence = self.channels[channel]
        hint: dict[str, Any] = {"app": app.id, "channels": [channel], "event": message.event}
        hint.update({"json": bytes(message.data).decode(), "except": self.socket_id, "type": "client_event"})
        if presence is not None:
            hint["user_id"] = presence.user_id_json.decode()
        await self.hub.publish_hint(ControlMessage(kind=HINT_EVENT, data=hint))

    # --- replies ---------------------------------------------------------------------------------------

    def error(self, code: int | None, message: str) -> None:
        """``pusher:error``; the socket stays open."""
        metrics.CLIENT_ERRORS.labels(protocol="pusher", type="null" if code is None else str(code)).inc()
        self.conn.send_text(wire.error(code, message))

    def _subscription_error(self, channel: str, kind: str, message: str, status: int) -> None:
        metrics.CLIENT_ERRORS.labels(protocol="pusher", type=kind).inc()
        self.conn.send_text(wire.subscription_error(channel, kind, message, status))

    def refuse(self, code: int, message: str, reason: str) -> None:
        """``pusher:error`` with ``code``, then close with the same code (§1.4: both, for older clients)."""
        if not self.conn.open:
            return
        self.error(code, message)
        self.conn.close(code, message[:100], reason=reason)


_HANDLERS: dict[str, Callable[[PusherSession, wire.ClientMessage], Coroutine[Any, Any, None]]] = {
    "pusher:ping": PusherSession._ping,
    "pusher:pong": PusherSession._pong,
    "pusher:subscribe": PusherSession._subscribe,
    "pusher:unsubscribe": PusherSession._unsubscribe,
    "pusher:signin": PusherSession._signin,
}
