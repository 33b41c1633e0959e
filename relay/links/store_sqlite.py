"""The SQLite link store (embedded mode): three tables in a SQLite file, every call on one worker thread.

As in :mod:`gateway.state.sqlite`: sqlite3 blocks, so one dedicated thread owns the only
connection and every call is shipped there and awaited; the file is in WAL mode, so the gateway's
state store may share it (with its own connection and thread). Records are msgpack blobs; only
what is searched or compared is a column: link uuid, company, asset and creation time; session
token hash and expiry; code (link, e-mail) and expiry. Times are integer microseconds since the
epoch, so comparisons and ordering are exact.

Expired sessions and codes are never returned: a read compares ``expires_at`` with now and deletes
what it finds expired, and every write of a session or code purges all expired ones (an indexed
range delete), which bounds the tables without a timer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import NamedTuple, TypeVar

import msgspec

from gateway.records import encode_msgpack
from gateway.state.sqlite import connect_wal
from relay.links.model import EmailCode, LinkSession, TrackingLink
from relay.links.store import LinkStoreError

T = TypeVar("T")

_decode_link = msgspec.msgpack.Decoder(TrackingLink).decode
_decode_session = msgspec.msgpack.Decoder(LinkSession).decode
_decode_code = msgspec.msgpack.Decoder(EmailCode).decode

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracking_links (
    uuid TEXT PRIMARY KEY,
    company_id TEXT NOT NULL,
    asset_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tracking_links_by_company ON tracking_links (company_id, created_us);
CREATE INDEX IF NOT EXISTS tracking_links_by_asset ON tracking_links (asset_id);
CREATE TABLE IF NOT EXISTS tracking_link_sessions (
    token_hash TEXT PRIMARY KEY,
    link_uuid TEXT NOT NULL,
    expires_us INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tracking_link_sessions_by_link ON tracking_link_sessions (link_uuid);
CREATE INDEX IF NOT EXISTS tracking_link_sessions_by_expiry ON tracking_link_sessions (expires_us);
CREATE TABLE IF NOT EXISTS tracking_link_codes (
    link_uuid TEXT NOT NULL,
    email TEXT NOT NULL,
    expires_us INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (link_uuid, email)
);
CREATE INDEX IF NOT EXISTS tracking_link_codes_by_expiry ON tracking_link_codes (expires_us);
"""


class _Expiring(NamedTuple):
    """A table of records with an ``expires_us`` column, and the SQL condition on its primary key."""

    name: str
    key: str


_SESSIONS = _Expiring("tracking_link_sessions", "token_hash = ?")  # columns: key, link_uuid, expires_us, record
_CODES = _Expiring("tracking_link_codes", "link_uuid = ? AND email = ?")  # columns: key..., expires_us, record

# Newest first; equal creation times by uuid, descending, as Redis' ZREVRANGE orders them.
_NEWEST_FIRST = "ORDER BY created_us DESC, uuid DESC"


def epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch, exact; naive times count as UTC (as ``fix_time_ms`` does)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _US


def _now_us() -> int:
    return epoch_us(datetime.now(UTC))


class SqliteLinkStore:
    """:class:`relay.links.store.LinkStore` on the SQLite file ``path`` (``":memory:"`` allowed)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetgate-links-sqlite")
        self._conn: sqlite3.Connection | None = None  # opened and used on the worker thread only
        self._closed = False

    async def put_link(self, link: TrackingLink) -> None:
        row = (link.uuid, link.company_id, link.asset_id, epoch_us(link.created_at), encode_msgpack(link))
        await self._call(partial(_upsert_link, row=row))

    async def get_link(self, uuid: str) -> TrackingLink | None:
        sql = "SELECT record FROM tracking_links WHERE uuid = ?"
        blob = await self._call(partial(_select_one, sql=sql, args=(uuid,)))
        return None if blob is None else _decode_link(blob)

    async def delete_link(self, uuid: str) -> bool:
        return await self._call(partial(_delete_link, uuid=uuid))

    async def list_links(self, company_id: str) -> list[TrackingLink]:
        sql = f"SELECT record FROM tracking_links WHERE company_id = ? {_NEWEST_FIRST}"
        return [_decode_link(blob) for blob in await self._call(partial(_select_all, sql=sql, args=(company_id,)))]

    async def links_for_asset(self, asset_id: str) -> list[TrackingLink]:
        sql = f"SELECT record FROM tracking_links WHERE asset_id = ? {_NEWEST_FIRST}"
        return [_decode_link(blob) for blob in await self._call(partial(_select_all, sql=sql, args=(asset_id,)))]

    async def put_session(self, session: LinkSession) -> None:
        row = (session.token_hash, session.link_uuid, epoch_us(session.expires_at), encode_msgpack(session))
        await self._call(partial(_put_expiring, table=_SESSIONS, row=row, key=row[:1], now_us=_now_us()))

    async def get_session(self, token_hash: str) -> LinkSession | None:
        blob = await self._call(partial(_get_unexpired, table=_SESSIONS, key=(token_hash,), now_us=_now_us()))
        return None if blob is None else _decode_session(blob)

    async def delete_sessions(self, link_uuid: str) -> int:
        return await self._call(partial(_delete_sessions, link_uuid=link_uuid, now_us=_now_us()))

    async def put_code(self, code: EmailCode) -> None:
        row = (code.link_uuid, code.email, epoch_us(code.expires_at), encode_msgpack(code))
        await self._call(partial(_put_expiring, table=_CODES, row=row, key=row[:2], now_us=_now_us()))

    async def get_code(self, link_uuid: str, email: str) -> EmailCode | None:
        blob = await self._call(partial(_get_unexpired, table=_CODES, key=(link_uuid, email), now_us=_now_us()))
        return None if blob is None else _decode_code(blob)

    async def delete_code(self, link_uuid: str, email: str) -> None:
        sql = f"DELETE FROM {_CODES.name} WHERE {_CODES.key}"
        await self._call(partial(_execute, sql=sql, args=(link_uuid, email)))

    async def close(self) -> None:
        """Close the connection on its thread, then stop the thread; calls after this raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)

    async def _call(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the link store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_job, job)

    # -- on the worker thread ------------------------------------------------

    def _run_job(self, job: Callable[[sqlite3.Connection], T]) -> T:
        with _unavailable():
            conn = self._conn if self._conn is not None else self._connect()
            return job(conn)

    def _connect(self) -> sqlite3.Connection:
        self._conn = connect_wal(self._path, _SCHEMA)
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@contextmanager
def _unavailable() -> Iterator[None]:
    """The file is locked past the busy timeout, unreadable, full or not a database: the store is unavailable."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
        raise  # our bug, not an outage
    except sqlite3.DatabaseError as exc:  # OperationalError (locked, I/O, cannot open) and corrupt files
        raise LinkStoreError(f"sqlite: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _select_one(conn: sqlite3.Connection, *, sql: str, args: tuple[str, ...]) -> bytes | None:
    row = conn.execute(sql, args).fetchone()
    return None if row is None else bytes(row[0])


def _select_all(conn: sqlite3.Connection, *, sql: str, args: tuple[str, ...]) -> list[bytes]:
    return [bytes(row[0]) for row in conn.execute(sql, args)]


def _execute(conn: sqlite3.Connection, *, sql: str, args: tuple[str, ...]) -> None:
    conn.execute(sql, args)


def _upsert_link(conn: sqlite3.Connection, *, row: tuple[str, str, str, int, bytes]) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO tracking_links (uuid, company_id, asset_id, created_us, record) VALUES (?, ?, ?, ?, ?)",
        row,
    )


def _delete_link(conn: sqlite3.Connection, *, uuid: str) -> bool:
    with _transaction(conn):
        existed = conn.execute("DELETE FROM tracking_links WHERE uuid = ?", (uuid,)).rowcount > 0
        conn.execute("DELETE FROM tracking_link_sessions WHERE link_uuid = ?", (uuid,))
        conn.execute("DELETE FROM tracking_link_codes WHERE link_uuid = ?", (uuid,))
    return existed


def _delete_sessions(conn: sqlite3.Connection, *, link_uuid: str, now_us: int) -> int:
    with _transaction(conn):
        sql = "DELETE FROM tracking_link_sessions WHERE link_uuid = ? AND expires_us > ?"
        live: int = conn.execute(sql, (link_uuid, now_us)).rowcount
        conn.execute("DELETE FROM tracking_link_sessions WHERE link_uuid = ?", (link_uuid,))  # the expired rest
    return live


def _put_expiring(
    conn: sqlite3.Connection, *, table: _Expiring, row: tuple[str, str, int, bytes], key: tuple[str, ...], now_us: int
) -> None:
    # Purging on every put keeps both tables bounded without a timer.
    with _transaction(conn):
        conn.execute(f"DELETE FROM {table.name} WHERE expires_us <= ?", (now_us,))
        if row[2] > now_us:
            conn.execute(f"INSERT OR REPLACE INTO {table.name} VALUES (?, ?, ?, ?)", row)
        else:  # born expired: replaces what was there with nothing, as a Redis key with no time left
            conn.execute(f"DELETE FROM {table.name} WHERE {table.key}", key)


def _get_unexpired(conn: sqlite3.Connection, *, table: _Expiring, key: tuple[str, ...], now_us: int) -> bytes | None:
    row = conn.execute(f"SELECT expires_us, record FROM {table.name} WHERE {table.key}", key).fetchone()
    if row is None:
        return None
    if row[0] <= now_us:
        conn.execute(f"DELETE FROM {table.name} WHERE {table.key} AND expires_us <= ?", (*key, now_us))
        return None
    return bytes(row[1])
