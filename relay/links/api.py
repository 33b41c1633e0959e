"""The tracking-link API's edges: its errors, the management request bodies, the public answers, validation.

Split from :mod:`relay.links.service` (which does the work) so the service reads as behaviour; the
REST layer (:mod:`relay.links.rest`) and the WebSocket side import the errors and bodies from here.
See the service's docstring for what each error code means.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import UNSET, UnsetType

from relay.links import model
from relay.links.model import AccessMode, Arrival, Schedule, Status, TrackingLink

MIN_SESSION_TTL_S = 60
MAX_SESSION_TTL_S = 7 * 24 * 3600
MAX_ALLOWED_EMAILS = 1000
MAX_WINDOWS = 50

# A soft syntax check: one @, a dot in the domain, no spaces or control characters, at most 254 characters.
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f.]+")

# -- errors ----------------------------------------------------------------------------------------


class LinkAccessError(Exception):
    """A viewer may not (or no longer) see a link; see the module docstring for the codes."""

    _KINDS: ClassVar[dict[int, tuple[int, str]]] = {
        4001: (401, "InvalidSession"),
        4002: (401, "SessionExpired"),
        4003: (404, "LinkNotFound"),
        4004: (403, "LinkInactive"),
        4005: (403, "OutsideSchedule"),
    }

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status, self.error = self._KINDS[code]
        self.message = message

    @property
    def reason(self) -> str:
        return self.error


def invalid_session() -> LinkAccessError:
    return LinkAccessError(4001, "the session token is not valid for this link; verify again")


def not_found() -> LinkAccessError:
    return LinkAccessError(4003, "no such tracking link")


INACTIVE: dict[Status, tuple[int, str]] = {
    "disabled": (4004, "this tracking link has been disabled"),
    "expired": (4004, "this tracking link has expired"),
    "outside_schedule": (4005, "this tracking link shows nothing at this time; come back later"),
}


class LinkRequestError(Exception):
    """A request refused for its content (not for who sent it)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message

    @property
    def reason(self) -> str:
        return self.error


def bad_request(message: str) -> LinkRequestError:
    return LinkRequestError(400, "BadRequest", message)


INVALID_CODE = "the code is wrong, used up or expired; ask for a new one"


# -- management input ------------------------------------------------------------------------------

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_Email = Annotated[str, msgspec.Meta(max_length=254)]
_Emails = Annotated[list[_Email], msgspec.Meta(max_length=MAX_ALLOWED_EMAILS)]
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]
_Ttl = Annotated[int, msgspec.Meta(ge=MIN_SESSION_TTL_S, le=MAX_SESSION_TTL_S)]


class _Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Client input: unknown fields are an error, not silently dropped."""


class NewLink(_Body, frozen=True, kw_only=True):
    """``POST /api/tracking-links``. ``company_id``: only a platform admin (company ``*``) names one."""

    asset_id: _Id
    display_name: _Name
    company_id: _Id | None = None
    job_id: _Id | None = None
    access_mode: AccessMode = "public"
    allowed_emails: _Emails = msgspec.field(default_factory=list)
    expires_at: _Aware | None = None
    arrival: Arrival | None = None
    schedule: Schedule | None = None
    session_ttl_s: _Ttl = model.DEFAULT_SESSION_TTL_S
    enabled: bool = True


class LinkPatch(_Body, frozen=True, kw_only=True):
    """``PATCH /api/tracking-links/{uuid}``: only the fields present change (null clears an optional one)."""

    asset_id: _Id | UnsetType = UNSET
    display_name: _Name | UnsetType = UNSET
    job_id: _Id | UnsetType | None = UNSET
    access_mode: AccessMode | UnsetType = UNSET
    allowed_emails: _Emails | UnsetType = UNSET
    expires_at: _Aware | UnsetType | None = UNSET
    arrival: Arrival | UnsetType | None = UNSET
    schedule: Schedule | UnsetType | None = UNSET
    session_ttl_s: _Ttl | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET


# -- public output ---------------------------------------------------------------------------------


class PublicInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What anyone with the link's uuid learns: how to get in, whether there is anything to see, its name.

    ``next_change``: when the link has a schedule and is not disabled or expired, the next instant
    at which it starts or stops showing the vehicle (it tells a viewer when to come back).
    """

    access_mode: AccessMode
    status: Status
    display_name: str
    next_change: datetime | None = None


class SessionGrant(msgspec.Struct, frozen=True, kw_only=True):
    """A successful verification: connect to ``{ws_url}/app/{app_key}`` and subscribe to ``channel``."""

    session_token: str
    expires_at: datetime
    channel: str
    ws_url: str
    app_key: str


class CodeSent(msgspec.Struct, frozen=True, kw_only=True):
    """Step 1 of ``email_code`` / ``authorized_only``: the same answer whether or not a mail went out."""

    code_sent: bool = True


# -- validation --------------------------------------------------------------------------------------


def checked_text(value: str, name: str) -> str:
    value = value.strip()
    if not value:
        raise bad_request(f"{name} must not be blank")
    return value


def checked_email(email: str | None) -> str:
    if email is None:
        raise bad_request('this link asks for an e-mail address: send {"email": ...}')
    address = model.normalise_email(email)
    if len(address) > 254 or not _EMAIL.fullmatch(address):
        raise bad_request("email is not a valid e-mail address")
    return address


def checked_emails(emails: list[str]) -> tuple[str, ...]:
    """Lower-cased, stripped, each checked, duplicates dropped (first kept)."""
    return tuple(dict.fromkeys(checked_email(e) for e in emails))


def changes_of(patch: LinkPatch) -> dict[str, Any]:
    changes = {name: getattr(patch, name) for name in patch.__struct_fields__ if getattr(patch, name) is not UNSET}
    for name in ("asset_id", "display_name"):
        if name in changes:
            changes[name] = checked_text(changes[name], name)
    if "allowed_emails" in changes:
        changes["allowed_emails"] = checked_emails(changes["allowed_emails"])
    return changes


def check_link(link: TrackingLink, now: datetime, *, new_expiry: bool) -> None:
    """Rules a link must satisfy after every create and update (the struct types check the rest)."""
    if link.access_mode == "authorized_only" and not link.allowed_emails:
        raise bad_request("access_mode authorized_only needs a non-empty allowed_emails list")
    if new_expiry and link.expires_at is not None and link.expires_at <= now:
        raise bad_request("expires_at must be in the future")
    if link.schedule is not None:
        check_schedule(link.schedule)


def check_schedule(schedule: Schedule) -> None:
    try:
        model.zone(schedule.timezone)
    except ValueError:
        raise bad_request(f"schedule.timezone: unknown time zone {schedule.timezone[:64]!r}") from None
    if not 1 <= len(schedule.windows) <= MAX_WINDOWS:
        raise bad_request(f"schedule.windows must hold 1 to {MAX_WINDOWS} windows")
    for window in schedule.windows:
        if not window.days:
            raise bad_request("every schedule window needs at least one day (0 = Monday ... 6 = Sunday)")
        if not window.start < window.end:  # "HH:MM" strings order as times; "24:00" is the latest
            raise bad_request(f"schedule window {window.start}-{window.end}: start must be before end")
