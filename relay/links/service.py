"""Tracking links as a service: management, the public verification flow, viewer sessions, the viewer's payload.

The REST half (:mod:`relay.links.rest`) and the WebSocket half (:mod:`relay.links.channel`) both
work through one :class:`LinkService` per relay instance. Every change to a link is stored first,
then announced to every relay instance (this one included) as a control hint::

    ControlMessage(kind="link_changed", data={"uuid": ..., "event": E, "asset_id": <current asset>, ...})

``E`` is ``created``, ``disabled`` (enabled -> false), ``vehicle_changed`` (asset reassigned; the
data also carries ``previous_asset_id``), ``deleted``, ``expired`` (:meth:`LinkService.mark_expired`)
or ``updated``; a listener treats an event it does not know as "the link changed: read it again".
Every PATCH publishes ``updated`` last, after ``disabled`` / ``vehicle_changed`` when they apply;
a ``created`` hint that cannot be sent is logged, not raised (the link is stored: a retried POST
would make a second one): arrival indexes (:mod:`relay.links.arrival`) find the link when their
entry for the asset is next refreshed. When a change ended the link's sessions (disable, delete, a
change of ``access_mode`` or ``allowed_emails``) the data carries ``"sessions_ended": true``:
connected viewers must go.

The public flow: :meth:`LinkService.info` (access mode, status, display name, next schedule
change), :meth:`LinkService.verify` by access mode, :meth:`LinkService.poll` (the polling fallback):

* ``public``: no credentials (an empty body);
* ``email``: any syntactically valid address, a soft gate: recorded on the session;
* ``email_code``: ``{"email"}`` mails a code (awaited: an SMTP failure answers 503), then
  ``{"email", "code"}`` opens the session;
* ``authorized_only``: as ``email_code``, but step 1 answers the same for every address and only a
  listed one gets a code, created and mailed in a background task (the answer takes as long either
  way); a guessed code is refused alike for listed and unlisted addresses.

Rate limits: :meth:`LinkService.limit_verify` per client address (the REST layer calls it before
reading the body) and inside :meth:`LinkService.poll` per session token.

Sessions: the token (256 random bits, URL-safe base64, 43 characters) is handed to the viewer once
and only its SHA-256 is stored; a session opens the one link it was made for and ends after the
link's ``session_ttl_s``. E-mailed codes: 6 digits, stored as an HMAC keyed with ``code_secret``,
valid 10 minutes, void after 5 wrong tries (tries are serialised per link and address within one
instance; across instances two concurrent wrong tries may both count from the same number).

Times come from ``clock`` (injectable). The stores compare expiries with the real clock as well,
so an expired session the store has already purged answers 4001 (unknown), not 4002.

Exceptions (beside :class:`~relay.links.store.LinkStoreError`, :class:`~relay.links.mail.MailError`,
:class:`~relay.ratelimit.RateLimited`, :class:`~relay.control.ControlError`)::

    LinkAccessError    a viewer may not (or no longer) see a link: ``code`` (WebSocket close code
                       and REST body) and ``status`` (HTTP)
        4001  401  InvalidSession    unknown or malformed token, or a token for another link
        4002  401  SessionExpired    the session outlived the link's session_ttl_s
        4003  404  LinkNotFound      no such link (never was, or deleted)
        4004  403  LinkInactive      disabled or expired (time, arrival)
        4005  403  OutsideSchedule   the link shows nothing at this time of the week
    LinkRequestError   a request refused for its content: ``status``, ``error`` (name), ``message``
                       (400 BadRequest, 403 InvalidCode, 404 NotFound for the management API)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import uuid as uuid_module
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from gateway.records import TrackedPosition
from gateway.state.base import StateStore
from relay.control import Control, ControlError, ControlMessage
from relay.links import api, model
from relay.links.api import CodeSent, LinkAccessError, LinkPatch, LinkRequestError, NewLink, PublicInfo, SessionGrant
from relay.links.geocode import Geocoder
from relay.links.mail import Mailer, MailError
from relay.links.model import (
    EmailCode,
    ExpiredReason,
    LinkSession,
    PublicLocation,
    Status,
    TrackingLink,
)
from relay.links.speeds import RecentSpeeds
from relay.links.store import LinkStore
from relay.ratelimit import MemoryRateLimiter, RateLimiter, enforce
from relay.settings import LinkSettings

__all__ = [
    "LINK_CHANGED",
    "CodeSent",
    "LinkAccessError",
    "LinkPatch",
    "LinkRequestError",
    "LinkService",
    "NewLink",
    "PublicInfo",
    "SessionGrant",
    "channel_name",
]

log = logging.getLogger(__name__)

LINK_CHANGED = "link_changed"  # the control message kind
RATE_WINDOW_S = 60.0  # the public limits are per minute

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43,128}")
_CODE = re.compile(r"[0-9]{6}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def channel_name(link_uuid: str) -> str:
    """The Pusher channel a link's viewers subscribe to."""
    return f"private-tracking-link.{link_uuid}"


# -- the service -----------------------------------------------------------------------------------


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


_Verifier = Callable[[TrackingLink, str | None, str | None], Coroutine[Any, Any, "SessionGrant | CodeSent"]]


class LinkService:
    """Tracking links for one relay instance (see the module docstring)."""

    def __init__(
        self,
        settings: LinkSettings,
        store: LinkStore,
        positions: StateStore,
        control: Control,
        mailer: Mailer,
        geocoder: Geocoder,
        speeds: RecentSpeeds,
        *,
        code_secret: str,
        ws_url: str,
        app_key: str,
        clock: Callable[[], datetime] = _utc_now,
        limiter: RateLimiter | None = None,
    ) -> None:
        if not code_secret:
            raise ValueError("code_secret must not be empty")
        self.settings = settings
        self.store = store
        self.positions = positions
        self.control = control
        self.mailer = mailer
        self.geocoder = geocoder
        self.speeds = speeds
        self.ws_url = ws_url  # the relay sets it once its WebSocket port is bound
        self.app_key = app_key
        self.clock = clock
        self.limiter: RateLimiter = limiter if limiter is not None else MemoryRateLimiter()
        self._code_secret = code_secret
        self._code_locks = _KeyedLocks()
        self._tasks: set[asyncio.Task[None]] = set()
        self._verifiers: dict[str, _Verifier] = {
            "public": self._verify_public,
            "email": self._verify_email,
            "email_code": self._verify_email_code,
            "authorized_only": self._verify_authorized,
        }

    # -- reading -----------------------------------------------------------------------------

    def status(self, link: TrackingLink) -> Status:
        return model.link_status(link, self.clock())

    async def link(self, uuid: str) -> TrackingLink | None:
        """The link with this uuid; None for an unknown or malformed one (never a store lookup for garbage)."""
        uuid = uuid.lower()
        return await self.store.get_link(uuid) if _UUID.fullmatch(uuid) else None

    async def session_for(self, token: str, link_uuid: str | None = None) -> tuple[LinkSession, TrackingLink]:
        """The session of ``token`` and its link, if that link may be shown now; :class:`LinkAccessError` if not.

        A token that opens no session, on a link (``link_uuid``) that is gone or inactive, answers
        for the link (4003, 4004): disabling and deleting end the sessions, and the viewer should
        learn why rather than that its token is unknown. A link's state is public (its info endpoint).
        """
        session = await self.store.get_session(model.token_hash(token)) if _TOKEN.fullmatch(token) else None
        if session is None:
            if link_uuid is not None:
                await self._explain_missing_session(link_uuid)
            raise api.invalid_session()
        if link_uuid is not None and session.link_uuid != link_uuid.lower():
            raise api.invalid_session()
        if session.expires_at <= self.clock():
            raise LinkAccessError(4002, "the session has expired; verify again")
        link = await self.store.get_link(session.link_uuid)
        if link is None:
            raise api.not_found()
        self._require_active(link)
        return session, link

    async def _explain_missing_session(self, link_uuid: str) -> None:
        link = await self.link(link_uuid)
        if link is None:
            raise api.not_found()
        if self.status(link) in ("disabled", "expired"):
            self._require_active(link)

    def _require_active(self, link: TrackingLink) -> None:
        inactive = api.INACTIVE.get(self.status(link))
        if inactive is not None:
            raise LinkAccessError(*inactive)

    async def public_location(self, link: TrackingLink) -> PublicLocation | None:
        """What a viewer sees now: the last position of the link's asset, if it is the link's company's."""
        located = await self._located(link)
        return None if located is None else located[1]

    async def _located(self, link: TrackingLink) -> tuple[TrackedPosition, PublicLocation] | None:
        record = await self.positions.last_position(link.asset_id)
        if record is None or record.company_id != link.company_id:
            return None  # an asset id of another company shows nothing, ever
        address = await self.geocoder.address(record.lat, record.lng)
        speed = self.speeds.recent_speed(link.asset_id, self.clock())
        return record, model.public_location(link, record, address, speed)

    # -- the public flow -------------------------------------------------------------------

    async def info(self, uuid: str) -> PublicInfo:
        link = await self.link(uuid)
        if link is None:
            raise api.not_found()
        now = self.clock()
        status = model.link_status(link, now)
        next_change = None
        if link.schedule is not None and status in ("active", "outside_schedule"):
            next_change = model.next_schedule_change(link.schedule, now)
        return PublicInfo(
            access_mode=link.access_mode, status=status, display_name=link.display_name, next_change=next_change
        )

    async def limit_verify(self, client: str) -> None:
        """Count one verification attempt from ``client`` (its IP address); :class:`RateLimited` beyond the limit.

        The REST layer calls it before it even reads the body, so malformed attempts count too.
        """
        await enforce(self.limiter, f"verify:{client}", self.settings.verify_per_minute_per_ip, RATE_WINDOW_S)

    async def verify(self, uuid: str, email: str | None, code: str | None) -> SessionGrant | CodeSent:
        """Step 1 or 2 of the link's access mode (see the module docstring); call :meth:`limit_verify` first."""
        link = await self.link(uuid)
        if link is None:
            raise api.not_found()
        self._require_active(link)
        return await self._verifiers[link.access_mode](link, email, code)

    async def _verify_public(self, link: TrackingLink, email: str | None, code: str | None) -> SessionGrant:
        if email is not None or code is not None:
            raise api.bad_request("this link is public: send an empty body")
        return await self._open_session(link, None)

    async def _verify_email(self, link: TrackingLink, email: str | None, code: str | None) -> SessionGrant:
        if code is not None:
            raise api.bad_request('this link asks for an e-mail address only: send {"email"}')
        return await self._open_session(link, api.checked_email(email))

    async def _verify_email_code(
        self, link: TrackingLink, email: str | None, code: str | None
    ) -> SessionGrant | CodeSent:
        address = api.checked_email(email)
        if code is None:
            await self._send_code(link, address)  # anyone may ask: awaited, so a mail failure answers 503
            return CodeSent()
        return await self._redeem(link, address, code)

    async def _verify_authorized(
        self, link: TrackingLink, email: str | None, code: str | None
    ) -> SessionGrant | CodeSent:
        address = api.checked_email(email)
        if code is None:
            # The same answer, as fast, for every address: the list cannot be probed. Only a listed
            # address gets a code, created and mailed after the answer.
            if address in link.allowed_emails:
                self._in_background(self._send_code(link, address))
            return CodeSent()
        return await self._redeem(link, address, code)

    async def _send_code(self, link: TrackingLink, email: str) -> None:
        code = model.new_code()
        expires_at = self.clock() + timedelta(seconds=model.CODE_TTL_S)
        digest = model.code_hash(self._code_secret, link.uuid, email, code)
        await self.store.put_code(EmailCode(link_uuid=link.uuid, email=email, code_hash=digest, expires_at=expires_at))
        await self.mailer.send_code(email, code, link.display_name, model.CODE_TTL_S // 60)

    async def _redeem(self, link: TrackingLink, email: str, code: str) -> SessionGrant:
        if not _CODE.fullmatch(code):
            raise api.bad_request("code must be the 6 digits from the mail")
        if not await self._code_matches(link, email, code):
            raise LinkRequestError(403, "InvalidCode", api.INVALID_CODE)
        return await self._open_session(link, email)

    async def _code_matches(self, link: TrackingLink, email: str, code: str) -> bool:
        """Check and consume the pending code; a wrong one costs an attempt, the last one voids it."""
        async with self._code_locks.hold((link.uuid, email)):
            pending = await self.store.get_code(link.uuid, email)
            if pending is None:
                return False
            if pending.expires_at <= self.clock():
                await self.store.delete_code(link.uuid, email)
                return False
            if hmac.compare_digest(pending.code_hash, model.code_hash(self._code_secret, link.uuid, email, code)):
                await self.store.delete_code(link.uuid, email)
                return True
            if pending.attempts_left <= 1:
                await self.store.delete_code(link.uuid, email)
            else:
                await self.store.put_code(msgspec.structs.replace(pending, attempts_left=pending.attempts_left - 1))
            return False

    async def _open_session(self, link: TrackingLink, email: str | None) -> SessionGrant:
        token = model.new_session_token()
        now = self.clock()
        expires_at = now + timedelta(seconds=link.session_ttl_s)
        session = LinkSession(
            token_hash=model.token_hash(token), link_uuid=link.uuid, created_at=now, expires_at=expires_at, email=email
        )
        await self.store.put_session(session)
        return SessionGrant(
            session_token=token,
            expires_at=expires_at,
            channel=channel_name(link.uuid),
            ws_url=self.ws_url,
            app_key=self.app_key,
        )

    async def poll(self, uuid: str, token: str) -> PublicLocation | None:
        """The polling fallback: the payload of the WebSocket event, or None before the first position.

        A position within the arrival radius (fixed after the link was created) expires the link, as
        :mod:`relay.links.arrival` does for every record; this answer still carries it, the next one is 4004.
        """
        if not _TOKEN.fullmatch(token):
            raise api.invalid_session()
        key = f"poll:{model.token_hash(token)}"
        await enforce(self.limiter, key, self.settings.poll_per_minute_per_session, RATE_WINDOW_S)
        _, link = await self.session_for(token, uuid)
        located = await self._located(link)
        if located is None:
            return None
        record, location = located
        if record.fix_time >= link.created_at and model.arrived(link, record):
            await self.mark_expired(link, "arrival")
        return location

    # -- management ------------------------------------------------------------------------

    async def list_links(self, company: str) -> list[TrackingLink]:
        return await self.store.list_links(company)

    async def managed_link(self, uuid: str, company: str | None) -> TrackingLink:
        """The link, if ``company`` (None: every company) manages it; another company's link is absent (404)."""
        link = await self.link(uuid)
        if link is None or (company is not None and link.company_id != company):
            raise LinkRequestError(404, "NotFound", "no such tracking link")
        return link

    async def create(self, company: str, body: NewLink) -> TrackingLink:
        now = self.clock()
        link = TrackingLink(
            uuid=str(uuid_module.uuid4()),
            company_id=company,
            asset_id=api.checked_text(body.asset_id, "asset_id"),
            display_name=api.checked_text(body.display_name, "display_name"),
            access_mode=body.access_mode,
            allowed_emails=api.checked_emails(body.allowed_emails),
            job_id=body.job_id,
            expires_at=body.expires_at,
            arrival=body.arrival,
            schedule=body.schedule,
            session_ttl_s=body.session_ttl_s,
            enabled=body.enabled,
            created_at=now,
            updated_at=now,
        )
        api.check_link(link, now, new_expiry=True)
        await self._check_asset(link)
        await self.store.put_link(link)
        log.info("tracking link %s created for company %s", link.uuid, company)
        try:  # the arrival index of every instance may hold the asset as one without links
            await self._announce(link, "created")
        except ControlError as exc:
            log.warning("tracking link %s: the created hint was not sent (%s)", link.uuid, exc)
        return link

    async def update(self, link: TrackingLink, patch: LinkPatch) -> TrackingLink:
        """Apply ``patch``, store, end sessions when access was disabled or changed, and tell every instance."""
        now = self.clock()
        changes = api.changes_of(patch)
        # Moving the expiry (or the destination) revives a link that expired by it.
        revived_by = {"time": "expires_at", "arrival": "arrival"}.get(link.expired_reason or "")
        if revived_by in changes:
            changes.update(expired_at=None, expired_reason=None)
        updated = msgspec.structs.replace(link, **changes, updated_at=now)
        api.check_link(updated, now, new_expiry="expires_at" in changes)
        if updated.asset_id != link.asset_id:
            await self._check_asset(updated)
        await self.store.put_link(updated)
        disabled = link.enabled and not updated.enabled
        access_changed = (updated.access_mode, updated.allowed_emails) != (link.access_mode, link.allowed_emails)
        ended = disabled or access_changed
        if ended:
            await self.store.delete_sessions(link.uuid)
        if disabled:
            await self._announce(updated, "disabled", sessions_ended=True)
        if updated.asset_id != link.asset_id:
            await self._announce(updated, "vehicle_changed", previous_asset_id=link.asset_id)
        await self._announce(updated, "updated", sessions_ended=ended)
        return updated

    async def delete(self, link: TrackingLink) -> None:
        """Remove the link with its sessions and codes; its viewers are disconnected everywhere."""
        await self.store.delete_link(link.uuid)
        await self._announce(link, "deleted", sessions_ended=True)
        log.info("tracking link %s deleted", link.uuid)

    async def mark_expired(self, link: TrackingLink, reason: str) -> TrackingLink:
        """Record that the link ended by itself (``arrival`` or ``time``) and tell every instance (``expired``).

        Idempotent: a link already marked (by this or another instance) is returned as stored.
        """
        if reason not in ("time", "arrival"):
            raise ValueError(f"a link expires by 'time' or 'arrival', not {reason!r}")
        current = await self.store.get_link(link.uuid)
        if current is None or current.expired_at is not None:
            return current if current is not None else link
        now = self.clock()
        why: ExpiredReason = "arrival" if reason == "arrival" else "time"
        expired = msgspec.structs.replace(current, expired_at=now, expired_reason=why, updated_at=now)
        await self.store.put_link(expired)
        await self._announce(expired, "expired")
        log.info("tracking link %s expired (%s)", link.uuid, reason)
        return expired

    async def _check_asset(self, link: TrackingLink) -> None:
        """An asset known to report for another company is refused; an unknown one (not reported yet) is fine.

        Either way a viewer only ever sees positions whose record names the link's company.
        """
        last = await self.positions.last_position(link.asset_id)
        if last is not None and last.company_id != link.company_id:
            raise api.bad_request("asset_id is not an asset of this company")

    async def _announce(self, link: TrackingLink, event: str, **extra: Any) -> None:
        data = {"uuid": link.uuid, "event": event, "asset_id": link.asset_id, **extra}
        await self.control.publish(ControlMessage(kind=LINK_CHANGED, data=data))

    # -- lifecycle ---------------------------------------------------------------------------

    def _in_background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._logged(job), name="tracking-link-mail")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _logged(job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except MailError as exc:
            log.warning("tracking link: the code mail could not be sent: %s", exc)
        except Exception:
            log.exception("tracking link: sending a code failed")

    async def close(self, timeout_s: float = 2.0) -> None:
        """Let mails being sent finish (bounded), then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
