"""The ``private-tracking-link.{uuid}`` channel on the Pusher protocol: who may watch, what they see, when they go.

A viewer's socket is authorised by ``POST /broadcasting/auth`` with a link *session* token
(:mod:`relay.pusher_http`): it signs the channel and records a :class:`Grant`, the session (token
hash, expiry) that socket uses for that link. The grant travels as a control hint (``link_grant``)
unless the socket is local, so it reaches the socket's relay instance whichever instance served the
HTTP call; a subscribe that overtakes its grant waits for it up to ``GRANT_WAIT_S``.

On ``pusher:subscribe``, after the signature check, :meth:`LinkChannels.admit` refuses with
``pusher:error`` and the same close code (pusher-js treats 4001-4099 as "refused": it stops):

=====  ==========================================================================================
4001   no grant of this socket for this link (no session, a session of another link), or the
       session is gone from the store
4002   the session is past its ``expires_at``
4003   the link does not exist (deleted)
4004   the link is disabled or expired (by time or on arrival)
4005   the link is outside its schedule window
=====  ==========================================================================================

While connected the same rules hold:

* ``link_changed`` hints, published by :class:`relay.links.service.LinkService` on every change and
  applied by every instance, reload the link: disabled: ``link.expired`` ``{"reason": "disabled"}``
  then 4004; deleted: 4003; expired: ``link.expired`` ``{"reason": "time" | "arrival"}`` then 4004;
  another vehicle: ``vehicle.changed`` ``{"display_name"}``, and positions of the new vehicle only.
  An ``updated`` link also has its viewers' sessions re-read: a session gone closes its sockets, 4001
  (the store is also swept every ``SESSION_SWEEP_S``);
* each link's status is re-evaluated by the service's clock (injectable) on a tick (every ``tick_s``)
  and by a timer at its next boundary (expiry, schedule change, a session's expiry): leaving the
  window: ``schedule.changed`` ``{"status": "outside_schedule", "next_change": ISO | null}`` then 4005;
  entering it: ``schedule.changed`` ``{"status": "active"}``; expired by time: ``link.expired``
  ``{"reason": "time"}`` then 4004; a session past its expiry: 4002, for its sockets only.

Positions: a hub record handler takes records of the assets shown by links with viewers here, of
the link's company only. Per link only the latest pending record is kept and at most
``messages_per_s`` go out: coalesced, never queued. Each is made public by
:func:`relay.links.model.public_location` (the address from the geocoder, awaited off the record
handler), encoded once, and its frame pushed to every viewer. Arrival is not checked here but by
:class:`relay.links.arrival.ArrivalWatch`, for every link, watched or not: its ``expired`` hint closes
the viewers on every instance.

What a viewer receives is built here from :class:`~relay.links.model.PublicLocation` or from the
literal fields above: no id but the link's own uuid, which is in the channel name already.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.records import TrackedPosition
from relay import metrics
from relay import pusher_channels as wire
from relay.control import ControlMessage
from relay.frames import text_frame
from relay.links import model
from relay.links.model import PublicLocation, Status, TrackingLink
from relay.links.service import LINK_CHANGED
from relay.links.store import LinkStoreError

if TYPE_CHECKING:
    from relay.links.service import LinkService
    from relay.pusher import PusherHub, PusherSession

log = logging.getLogger(__name__)

HINT_GRANT = "link_grant"  # {"socket_id", "token_hash", "link", "expires_at": unix seconds}
HINT_CHANGED = LINK_CHANGED  # {"uuid", "event", "asset_id", "sessions_ended"?}: published by LinkService

LOCATION_EVENT = "location.updated"
EXPIRED_EVENT = "link.expired"
SCHEDULE_EVENT = "schedule.changed"
VEHICLE_EVENT = "vehicle.changed"

CODE_INVALID_SESSION = 4001
CODE_SESSION_EXPIRED = 4002
CODE_LINK_NOT_FOUND = 4003
CODE_LINK_ENDED = 4004
CODE_OUTSIDE_SCHEDULE = 4005

TICK_S = 1.0  # status re-evaluation; also what makes an injected clock's jump count
GRANT_WAIT_S = 2.0  # a grant hint from another instance may trail the client's subscribe
SESSION_SWEEP_S = 30.0  # viewers' sessions re-read from the store: a safety net, changes come as hints
TIMER_SLACK_S = 0.01  # a boundary timer fires just after the boundary
MAX_TIMER_S = 24 * 3600.0  # farther boundaries are left to the tick, which re-arms

# (code, message, metric reason): messages are ours and carry no ids.
Close = tuple[int, str, str]
_INVALID_SESSION = (CODE_INVALID_SESSION, "Invalid session: authorise this link at /broadcasting/auth", "link_session")
_SESSION_EXPIRED = (CODE_SESSION_EXPIRED, "The session has expired: verify the link again", "link_session_expired")
_NOT_FOUND = (CODE_LINK_NOT_FOUND, "The tracking link does not exist", "link_not_found")
_ENDED: dict[str, Close] = {
    "disabled": (CODE_LINK_ENDED, "The tracking link has been disabled", "link_disabled"),
    "expired": (CODE_LINK_ENDED, "The tracking link has expired", "link_expired"),
    "outside_schedule": (CODE_OUTSIDE_SCHEDULE, "The tracking link is outside its schedule window", "link_schedule"),
}

_encode = msgspec.json.Encoder().encode

# Events of HINT_CHANGED that need nothing here: nobody watches a link that did not exist. Any other event,
# one added later included, makes a watched link reload from the store.
_NOTHING_TO_VIEWERS = frozenset({"created"})


class Grant(msgspec.Struct, frozen=True, gc=False):
    """The session a socket was authorised with for one link."""

    token_hash: str
    link_uuid: str
    expires_at: datetime


@dataclass(eq=False)
class WatchedLink:
    """A link with viewers on this instance."""

    link: TrackingLink
    status: Status
    viewers: dict[PusherSession, Grant] = field(default_factory=dict)
    pending: TrackedPosition | None = None  # the latest record not sent yet (coalescing)
    last_fix: datetime | None = None  # fix time of the last record sent: older ones are dropped
    next_send: float = 0.0  # loop time before which no position goes out (rate limit)
    pump: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    deadline: datetime | None = None  # the boundary the timer is armed for
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one link change at a time

    @property
    def channel(self) -> str:
        return wire.TRACKING_LINK_PREFIX + self.link.uuid


class LinkChannels:
    """Tracking-link channels of one relay instance, over :class:`~relay.pusher.PusherHub` (which calls
    :meth:`admit`, :meth:`forget` and :meth:`note_grant`) and a :class:`LinkService`.

    ``messages_per_s`` caps the positions per link channel; ``tick_s`` is the period of the status
    re-evaluation."""

    def __init__(
        self,
        service: LinkService,
        pusher: PusherHub,
        *,
        messages_per_s: float = 10.0,
        tick_s: float = TICK_S,
    ) -> None:
        self.service = service
        self.pusher = pusher
        self.interval = 1.0 / messages_per_s if messages_per_s > 0 else 0.0
        self.tick_s = tick_s
        self.grant_wait_s = GRANT_WAIT_S
        self.watched: dict[str, WatchedLink] = {}  # link uuid -> viewers here
        self.by_asset: dict[str, set[str]] = {}  # asset id -> uuids of watched links showing it
        self.grants: dict[str, dict[str, Grant]] = {}  # socket id (this instance) -> link uuid -> grant
        self._grant_waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        # Links being admitted (not watched yet) -> changes announced meanwhile, replayed once watched.
        self._admitting: dict[str, list[tuple[str, bool]]] = {}
        self._admissions: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        pusher.hub.handlers.append(self.on_record)
        pusher.control.add_listener(self.on_control)

    async def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="link-channels-tick")

    async def close(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for watched in self.watched.values():
            if watched.timer is not None:
                watched.timer.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._ticker = None

    # --- the Pusher hub's hooks ------------------------------------------------------------------------

    async def note_grant(self, socket_id: str, token_hash: str, link_uuid: str, expires_at: datetime) -> None:
        """``socket_id`` may subscribe to the link's channel with this session; on every instance.

        Raises :class:`relay.control.ControlError` when the hint for another instance is not sent."""
        grant = {"socket_id": socket_id, "token_hash": token_hash, "link": link_uuid, "expires_at": _unix(expires_at)}
        if socket_id in self.pusher.sessions:
            self._on_grant(grant)
        else:
            await self.pusher.control.publish(ControlMessage(kind=HINT_GRANT, data=grant))

    async def admit(self, session: PusherSession, channel: str) -> list[bytes] | None:
        """Check the socket's session and the link (see the module docstring) and register the viewer.

        None: refused (the socket is being closed, or got a ``pusher:subscription_error`` when the link
        store is unreachable). Otherwise the frames to send right after ``subscription_succeeded``:
        the link's current position, when there is one."""
        link_uuid = channel[len(wire.TRACKING_LINK_PREFIX) :]
        self._admissions[link_uuid] += 1
        self._admitting.setdefault(link_uuid, [])
        try:
            return await self._admit(session, channel, link_uuid)
        finally:
            self._admissions[link_uuid] -= 1
            if not self._admissions[link_uuid]:
                del self._admissions[link_uuid]
                missed = self._admitting.pop(link_uuid)
                if link_uuid in self.watched:
                    for event, sessions_ended in missed:
                        self._spawn(self._changed(link_uuid, event, sessions_ended))

    async def _admit(self, session: PusherSession, channel: str, link_uuid: str) -> list[bytes] | None:
        grant = await self._grant_of(session.socket_id, link_uuid)
        if grant is None:
            return self._refused(session, _INVALID_SESSION)
        service = self.service
        if grant.expires_at <= service.clock():
            return self._refused(session, _SESSION_EXPIRED)
        try:
            link = await service.link(link_uuid)
            if link is None:
                return self._refused(session, _NOT_FOUND)
            status = service.status(link)
            if status != "active":
                return self._refused(session, _ENDED[status])
            if not await self._session_exists(grant):  # ended by a change since the grant
                return self._refused(session, _INVALID_SESSION)
        except LinkStoreError as exc:
            log.warning("tracking link subscription: link store unavailable (%s)", exc)
            session.conn.send_text(wire.subscription_error(channel, "ServerError", "try again", 503))
            return None
        snapshot = await self._snapshot(link)
        if not session.conn.open:
            return None
        watched = self._watch(link, status)
        watched.viewers[session] = grant
        self._arm(watched, service.clock())
        if snapshot is None:
            return []
        return [text_frame(wire.channel_event(LOCATION_EVENT, channel, wire.as_json_string(_encode(snapshot))))]

    def forget(self, session: PusherSession, channel: str | None = None) -> None:
        """The socket left ``channel`` (unsubscribed), or every link channel (closed: None)."""
        if channel is None:
            uuids = list(self.grants.pop(session.socket_id, ()))
        else:
            uuids = [channel[len(wire.TRACKING_LINK_PREFIX) :]]
        for link_uuid in uuids:
            watched = self.watched.get(link_uuid)
            if watched is not None and watched.viewers.pop(session, None) is not None and not watched.viewers:
                self._unwatch(watched)

    # --- grants ------------------------------------------------------------------------------------------

    def _on_grant(self, data: dict[str, Any]) -> None:
        socket_id, link_uuid = str(data.get("socket_id")), str(data.get("link"))
        if socket_id not in self.pusher.sessions:
            return  # on another instance, or gone
        try:
            expires_at = datetime.fromtimestamp(float(data["expires_at"]), UTC)
        except (KeyError, TypeError, ValueError):
            log.warning("tracking link: dropping a malformed grant hint")
            return
        grant = Grant(str(data.get("token_hash")), link_uuid, expires_at)
        self.grants.setdefault(socket_id, {})[link_uuid] = grant
        waiter = self._grant_waiters.pop((socket_id, link_uuid), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _grant_of(self, socket_id: str, link_uuid: str) -> Grant | None:
        grant = self.grants.get(socket_id, {}).get(link_uuid)
        if grant is not None:
            return grant
        key = (socket_id, link_uuid)
        waiter = self._grant_waiters.setdefault(key, self.loop.create_future())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.grant_wait_s)
        except TimeoutError:
            pass
        finally:
            if self._grant_waiters.get(key) is waiter:
                del self._grant_waiters[key]
        return self.grants.get(socket_id, {}).get(link_uuid)

    async def _session_exists(self, grant: Grant) -> bool:
        return await self.service.store.get_session(grant.token_hash) is not None

    # --- watched links ----------------------------------------------------------------------------------

    def _watch(self, link: TrackingLink, status: Status) -> WatchedLink:
        watched = self.watched.get(link.uuid)
        if watched is None:
            watched = self.watched[link.uuid] = WatchedLink(link, status)
            self.by_asset.setdefault(link.asset_id, set()).add(link.uuid)
        return watched

    def _unwatch(self, watched: WatchedLink) -> None:
        link = watched.link
        if self.watched.get(link.uuid) is watched:
            del self.watched[link.uuid]
        self._unindex(link)
        if watched.timer is not None:
            watched.timer.cancel()
        if watched.pump is not None:
            watched.pump.cancel()
        watched.pending = None

    def _unindex(self, link: TrackingLink) -> None:
        uuids = self.by_asset.get(link.asset_id)
        if uuids is not None:
            uuids.discard(link.uuid)
            if not uuids:
                del self.by_asset[link.asset_id]

    def _end(self, watched: WatchedLink, close: Close, sessions: list[PusherSession] | None = None) -> None:
        """Close ``sessions`` (default: every viewer) with ``close``; the link is unwatched when none is left."""
        targets = list(watched.viewers) if sessions is None else sessions
        for session in targets:
            watched.viewers.pop(session, None)
            self._refused(session, close)
        if not watched.viewers:
            self._unwatch(watched)

    @staticmethod
    def _refused(session: PusherSession, close: Close) -> list[bytes] | None:
        """``pusher:error`` with the code, then close with it; None, for :meth:`admit` to return."""
        code, message, reason = close
        session.refuse(code, message, reason)
        return None

    # --- status: tick, timers, hints ------------------------------------------------------------------

    async def _tick(self) -> None:
        next_sweep = self.loop.time() + SESSION_SWEEP_S
        while True:
            await asyncio.sleep(self.tick_s)
            for watched in list(self.watched.values()):
                if self.watched.get(watched.link.uuid) is watched:
                    try:
                        self._evaluate(watched, rearm=False)
                    except Exception:
                        log.exception("tracking link: status check failed")
            if self.loop.time() >= next_sweep:
                next_sweep = self.loop.time() + SESSION_SWEEP_S
                for watched in list(self.watched.values()):
                    self._spawn(self._sweep_sessions(watched))

    def _on_boundary(self, link_uuid: str) -> None:
        watched = self.watched.get(link_uuid)
        if watched is not None:
            watched.timer = None
            self._evaluate(watched)

    def _evaluate(self, watched: WatchedLink, *, rearm: bool = True) -> None:
        """Apply a change of the link's status and end expired sessions; then (``rearm``, or after a change)
        arm the timer for the next boundary. The tick does not re-arm: boundaries cost a schedule walk."""
        now = self.service.clock()
        status = self.service.status(watched.link)
        if status != watched.status:
            previous, watched.status = watched.status, status
            self._transition(watched, previous, now)
            rearm = True
            if self.watched.get(watched.link.uuid) is not watched:
                return
        expired = [s for s, grant in watched.viewers.items() if grant.expires_at <= now]
        if expired:
            self._end(watched, _SESSION_EXPIRED, expired)
            rearm = True
        if rearm and self.watched.get(watched.link.uuid) is watched:
            self._arm(watched, now)

    def _transition(self, watched: WatchedLink, previous: Status, now: datetime) -> None:
        link, status = watched.link, watched.status
        if status == "active":
            if previous == "outside_schedule":
                self._deliver(watched, SCHEDULE_EVENT, {"status": "active"})
            return
        if status == "outside_schedule":
            change = model.next_schedule_change(link.schedule, now) if link.schedule is not None else None
            self._deliver(watched, SCHEDULE_EVENT, {"status": "outside_schedule", "next_change": change})
        elif status == "expired" and link.expired_reason == "deleted":
            self._end(watched, _NOT_FOUND)
            return
        else:
            reason = "disabled" if status == "disabled" else link.expired_reason or "time"
            self._deliver(watched, EXPIRED_EVENT, {"reason": reason})
        self._end(watched, _ENDED[status])

    def _arm(self, watched: WatchedLink, now: datetime) -> None:
        """A timer at the link's next boundary. A boundary is armed once only (a frozen test clock would
        otherwise make it fire in a loop), and not at all beyond ``MAX_TIMER_S``: the tick covers those."""
        deadline = self._next_boundary(watched, now)
        if deadline == watched.deadline:
            return
        if watched.timer is not None:
            watched.timer.cancel()
            watched.timer = None
        watched.deadline = deadline
        if deadline is None:
            return
        delay = (deadline - now).total_seconds()
        if delay > MAX_TIMER_S:
            return
        watched.timer = self.loop.call_later(max(0.0, delay) + TIMER_SLACK_S, self._on_boundary, watched.link.uuid)

    @staticmethod
    def _next_boundary(watched: WatchedLink, now: datetime) -> datetime | None:
        link = watched.link
        candidates = [grant.expires_at for grant in watched.viewers.values()]
        if link.expires_at is not None:
            candidates.append(link.expires_at)
        if link.schedule is not None:
            change = model.next_schedule_change(link.schedule, now)
            if change is not None:
                candidates.append(change)
        upcoming = [c for c in candidates if c > now]
        return min(upcoming) if upcoming else None

    def on_control(self, message: ControlMessage) -> None:
        """Grants and link changes from every instance (a :class:`relay.control.Control` listener)."""
        if message.kind == HINT_GRANT:
            self._on_grant(message.data)
        elif message.kind == HINT_CHANGED:
            link_uuid, event = str(message.data.get("uuid")), str(message.data.get("event"))
            if event in _NOTHING_TO_VIEWERS:
                return
            ended = bool(message.data.get("sessions_ended"))
            if link_uuid in self.watched:
                self._spawn(self._changed(link_uuid, event, ended))
            elif link_uuid in self._admitting:  # a viewer is being admitted with what it read before
                self._admitting[link_uuid].append((event, ended))

    async def _changed(self, link_uuid: str, event: str, sessions_ended: bool) -> None:
        watched = self.watched.get(link_uuid)
        if watched is None:
            return
        async with watched.lock:
            if self.watched.get(link_uuid) is not watched:
                return
            if event == "deleted":
                self._end(watched, _NOT_FOUND)
                return
            if event == "disabled":  # no store read: disabling must work even when the store does not answer
                previous, watched.status = watched.status, "disabled"
                self._transition(watched, previous, self.service.clock())
                return
            if sessions_ended:  # access changed: every session of the link was deleted
                self._end(watched, _INVALID_SESSION)
                return
            try:
                link = await self.service.link(link_uuid)
            except LinkStoreError as exc:
                log.warning("tracking link: change not applied, link store unavailable (%s)", exc)
                return
            if self.watched.get(link_uuid) is not watched:
                return
            if link is None:
                self._end(watched, _NOT_FOUND)
                return
            self._replace(watched, link)
            self._evaluate(watched)
            if event == "updated" and self.watched.get(link_uuid) is watched:
                await self._sweep_sessions(watched)

    def _replace(self, watched: WatchedLink, link: TrackingLink) -> None:
        """The reloaded link; another vehicle: ``vehicle.changed`` and only its records from now on."""
        old, watched.link = watched.link, link
        if link.asset_id == old.asset_id:
            return
        self._unindex(old)
        self.by_asset.setdefault(link.asset_id, set()).add(link.uuid)
        watched.pending, watched.last_fix = None, None
        self._deliver(watched, VEHICLE_EVENT, {"display_name": link.display_name})

    async def _sweep_sessions(self, watched: WatchedLink) -> None:
        """Close the viewers whose session is gone from the store (4001); expired ones get 4002 from the tick."""
        now = self.service.clock()
        hashes = {grant.token_hash for grant in watched.viewers.values() if grant.expires_at > now}
        try:
            gone = {h for h in hashes if await self.service.store.get_session(h) is None}
        except LinkStoreError as exc:
            log.warning("tracking link: sessions not checked, link store unavailable (%s)", exc)
            return
        if gone and self.watched.get(watched.link.uuid) is watched:
            self._end(watched, _INVALID_SESSION, [s for s, g in watched.viewers.items() if g.token_hash in gone])

    # --- positions -------------------------------------------------------------------------------------

    def on_record(self, record: TrackedPosition) -> None:
        """Keep the record as its links' latest pending position (a hub handler: synchronous, no I/O)."""
        uuids = self.by_asset.get(record.asset_id)
        if not uuids:
            return
        for link_uuid in tuple(uuids):
            watched = self.watched[link_uuid]
            link = watched.link
            if record.company_id != link.company_id or self.service.status(link) != "active":
                continue
            if watched.last_fix is not None and record.fix_time <= watched.last_fix:
                continue
            pending = watched.pending
            if pending is None or record.fix_time >= pending.fix_time:
                watched.pending = record
            if watched.pump is None:
                watched.pump = self._spawn(self._pump(watched))

    async def _pump(self, watched: WatchedLink) -> None:
        """Send the latest pending record, at most one per ``interval``, until none is pending."""
        try:
            while watched.pending is not None:
                delay = watched.next_send - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                record, watched.pending = watched.pending, None
                if record is None:
                    break
                watched.next_send = self.loop.time() + self.interval
                watched.last_fix = record.fix_time
                await self._send_location(watched, record)
        finally:
            watched.pump = None

    async def _send_location(self, watched: WatchedLink, record: TrackedPosition) -> None:
        link = watched.link
        public = await self._public(link, record)
        if watched.link.asset_id != record.asset_id or self.watched.get(link.uuid) is not watched:
            return  # another vehicle by now, or no viewers left
        self._deliver_json(watched, LOCATION_EVENT, _encode(public))

    async def _public(self, link: TrackingLink, record: TrackedPosition) -> PublicLocation:
        try:
            address = await self.service.geocoder.address(record.lat, record.lng)
        except Exception:  # a geocoder answers None rather than raising; a bug must not stop positions
            log.exception("tracking link: geocoder failed")
            address = None
        speed = None
        if link.arrival is not None:
            speed = self.service.speeds.recent_speed(record.asset_id, record.fix_time)
        return model.public_location(link, record, address, speed)

    async def _snapshot(self, link: TrackingLink) -> PublicLocation | None:
        """The link's current position for a new viewer (what polling answers), None when unknown."""
        try:
            return await self.service.public_location(link)
        except Exception as exc:  # the viewer gets the next live position instead
            log.warning("tracking link: no current position for a new viewer (%s)", exc)
            return None

    # --- delivery --------------------------------------------------------------------------------------

    def _deliver(self, watched: WatchedLink, event: str, data: dict[str, Any]) -> None:
        self._deliver_json(watched, event, _encode(data))

    def _deliver_json(self, watched: WatchedLink, event: str, data_json: bytes) -> None:
        """One event to the channel's members in every app: encoded once, data as a JSON string."""
        channel = watched.channel
        frame = text_frame(wire.channel_event(event, channel, wire.as_json_string(data_json)))
        hub, delivered = self.pusher.hub, 0
        for app_id in self.pusher.apps_by_id:
            for conn in hub.channels.get(wire.hub_key(app_id, channel), ()):
                conn.push(frame)
                delivered += 1
        metrics.MESSAGES_OUT.labels(protocol="pusher", type="tracking_link").inc(delivered)
        hub.server.schedule_flush()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tracking link: background task failed", exc_info=task.exception())


def _unix(moment: datetime) -> float:
    return moment.timestamp()
