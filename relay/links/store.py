"""The link store contract: tracking links, viewer sessions and pending e-mail codes.

Two drivers implement it: :mod:`relay.links.store_sqlite` (embedded mode, its
own table in a SQLite file) and :mod:`relay.links.store_redis` (distributed
mode). One conformance suite (``tests/test_link_store.py``) runs against both.
Sessions and codes expire by their ``expires_at``: a driver never returns an
expired one, and removes them in time (Redis key TTLs; SQLite on access and
with a periodic purge).
"""

from __future__ import annotations

from typing import Protocol

from relay.links.model import EmailCode, LinkSession, TrackingLink


class LinkStoreError(Exception):
    """The store could not be reached or answered wrongly; REST maps it to 503."""

    reason = "link_store_unavailable"


class LinkStore(Protocol):
    async def put_link(self, link: TrackingLink) -> None:
        """Insert or replace the link with this uuid."""
        ...

    async def get_link(self, uuid: str) -> TrackingLink | None: ...

    async def delete_link(self, uuid: str) -> bool:
        """Remove the link, its sessions and its codes; True if it existed."""
        ...

    async def list_links(self, company_id: str) -> list[TrackingLink]:
        """A company's links, newest first (``created_at``)."""
        ...

    async def links_for_asset(self, asset_id: str) -> list[TrackingLink]:
        """Every link currently showing this asset (any company: the caller filters by record company)."""
        ...

    async def put_session(self, session: LinkSession) -> None: ...

    async def get_session(self, token_hash: str) -> LinkSession | None:
        """The unexpired session with this token hash."""
        ...

    async def delete_sessions(self, link_uuid: str) -> int:
        """End every session of a link; how many there were."""
        ...

    async def put_code(self, code: EmailCode) -> None:
        """Insert or replace the pending code for (link, e-mail)."""
        ...

    async def get_code(self, link_uuid: str, email: str) -> EmailCode | None:
        """The unexpired pending code for (link, e-mail)."""
        ...

    async def delete_code(self, link_uuid: str, email: str) -> None: ...

    async def close(self) -> None: ...


def open_link_store(driver: str, *, sqlite_path: str, redis_url: str, prefix: str) -> LinkStore:
    """The driver named ``driver`` ("sqlite" or "redis"); only that driver's module is imported."""
    if driver == "redis":
        from relay.links.store_redis import RedisLinkStore

        return RedisLinkStore(redis_url, prefix)
    if driver == "sqlite":
        from relay.links.store_sqlite import SqliteLinkStore

        return SqliteLinkStore(sqlite_path)
    raise ValueError(f"unknown link store driver {driver!r} (sqlite | redis)")
