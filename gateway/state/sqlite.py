"""The SQLite state store (embedded mode): one database file in WAL mode, every call on one worker thread.

sqlite3 blocks, so each call is shipped to a single dedicated thread that
owns the only connection, and awaited there; the event loop never waits on
the disk, and one thread means no locking between our own calls.

``get_device`` runs on every device login, so devices found are cached in
memory. The cache is dropped on our own ``put_device`` / ``remove_device``,
and also when another process (``fleetgate devices``) committed to the file:
SQLite's ``PRAGMA data_version`` changes exactly then, and it is read after
every call on the worker. Entries also expire after ``device_cache_ttl_s``,
which bounds how long such an edit stays unseen by an otherwise idle store.
Unknown IMEIs are never cached, so a device registered by another process
is found on its next login.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from gateway.records import Device, TrackedPosition, decode_position, encode_msgpack
from gateway.settings import StateSettings
from gateway.state import fix_time_ms

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    imei TEXT PRIMARY KEY,
    asset_id TEXT NOT NULL,
    company_id TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    speed_limit_kmh REAL,
    protocol TEXT
);
CREATE INDEX IF NOT EXISTS devices_by_company ON devices (company_id, imei);
CREATE TABLE IF NOT EXISTS last_positions (
    asset_id TEXT PRIMARY KEY,
    company_id TEXT NOT NULL,
    fix_time_ms INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS last_positions_by_company ON last_positions (company_id, asset_id);
"""

_DEVICE_COLUMNS = "imei, asset_id, company_id, display_name, speed_limit_kmh, protocol"

# ">=": of two records with the same fix time the later one written wins, as in the Redis driver.
_UPSERT_POSITION = """
INSERT INTO last_positions (asset_id, company_id, fix_time_ms, record) VALUES (?, ?, ?, ?)
ON CONFLICT (asset_id) DO UPDATE SET
    company_id = excluded.company_id, fix_time_ms = excluded.fix_time_ms, record = excluded.record
WHERE excluded.fix_time_ms >= last_positions.fix_time_ms
"""

DeviceRow = tuple[str, str, str, str, float | None, str | None]


class SqliteStateStore:
    """:class:`gateway.state.base.StateStore` on the file ``settings.sqlite_path`` (``":memory:"`` allowed)."""

    def __init__(self, settings: StateSettings, *, device_cache_ttl_s: float = 30.0) -> None:
        self._path = settings.sqlite_path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetgate-sqlite")
        self._conn: sqlite3.Connection | None = None  # opened and used on the worker thread only
        self._data_version: int | None = None
        self._devices: dict[str, tuple[Device, float]] = {}  # imei -> (device, expiry on the monotonic clock)
        self._generation = 0  # bumped whenever the cache is dropped; a lookup started before may not fill it
        self._cache_ttl_s = device_cache_ttl_s
        self._closed = False

    async def get_device(self, imei: str) -> Device | None:
        cached = self._devices.get(imei)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        generation = self._generation
        row = await self._call(partial(_select_device, imei=imei))
        if row is None:
            return None
        device = _device(row)
        if generation == self._generation:
            self._devices[imei] = (device, time.monotonic() + self._cache_ttl_s)
        return device

    async def put_device(self, device: Device) -> None:
        self._forget_devices()
        row = (
            device.imei,
            device.asset_id,
            device.company_id,
            device.display_name,
            device.speed_limit_kmh,
            device.protocol,
        )
        await self._call(partial(_upsert_device, row=row))

    async def remove_device(self, imei: str) -> bool:
        self._forget_devices()
        return await self._call(partial(_delete_device, imei=imei))

    async def list_devices(self, company_id: str | None = None) -> list[Device]:
        rows = await self._call(partial(_select_devices, company_id=company_id))
        return [_device(row) for row in rows]

    async def save_last_positions(self, records: Sequence[TrackedPosition]) -> None:
        if not records:
            return
        rows = [(r.asset_id, r.company_id, fix_time_ms(r.fix_time), encode_msgpack(r)) for r in records]
        await self._call(partial(_upsert_positions, rows=rows))

    async def last_position(self, asset_id: str) -> TrackedPosition | None:
        blob = await self._call(partial(_select_position, asset_id=asset_id))
        return None if blob is None else decode_position(blob)

    async def last_positions(self, company_id: str) -> list[TrackedPosition]:
        blobs = await self._call(partial(_select_positions, company_id=company_id))
        return [decode_position(blob) for blob in blobs]

    async def close(self) -> None:
        """Close the connection on its thread, then stop the thread; calls after this raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)
            self._devices.clear()

    def _forget_devices(self) -> None:
        self._devices.clear()
        self._generation += 1

    async def _call(self, job: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        result, data_version = await loop.run_in_executor(self._executor, self._run_job, job)
        if data_version != self._data_version:
            if self._data_version is not None:  # another connection committed: cached devices may be stale
                self._forget_devices()
            self._data_version = data_version
        return result

    # -- on the worker thread ------------------------------------------------

    def _run_job(self, job: Callable[[sqlite3.Connection], T]) -> tuple[T, int]:
        conn = self._conn if self._conn is not None else self._connect()
        result = job(conn)
        data_version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        return result, data_version

    def _connect(self) -> sqlite3.Connection:
        self._conn = connect_wal(self._path, _SCHEMA)
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def connect_wal(path: str, schema: str) -> sqlite3.Connection:
    """A connection for one worker thread: autocommit, WAL, a busy timeout, ``schema`` applied.

    Autocommit (isolation_level=None): one statement is its own transaction; batches BEGIN
    explicitly. The busy timeout waits for another connection's writer (``fleetgate devices``,
    the link store). In WAL mode ``synchronous = NORMAL`` survives a process crash; a power cut
    may lose the last commits, which for last positions the next fixes replace.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn


def _device(row: DeviceRow) -> Device:
    imei, asset_id, company_id, display_name, speed_limit_kmh, protocol = row
    return Device(
        imei=imei,
        asset_id=asset_id,
        company_id=company_id,
        display_name=display_name,
        speed_limit_kmh=speed_limit_kmh,
        protocol=protocol,
    )


def _select_device(conn: sqlite3.Connection, *, imei: str) -> DeviceRow | None:
    row: DeviceRow | None = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE imei = ?", (imei,)).fetchone()
    return row


def _select_devices(conn: sqlite3.Connection, *, company_id: str | None) -> list[DeviceRow]:
    if company_id is None:
        cursor = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY imei")
    else:
        cursor = conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE company_id = ? ORDER BY imei", (company_id,)
        )
    return cursor.fetchall()


def _upsert_device(conn: sqlite3.Connection, *, row: DeviceRow) -> None:
    conn.execute(f"INSERT OR REPLACE INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", row)


def _delete_device(conn: sqlite3.Connection, *, imei: str) -> bool:
    return conn.execute("DELETE FROM devices WHERE imei = ?", (imei,)).rowcount > 0


def _upsert_positions(conn: sqlite3.Connection, *, rows: list[tuple[str, str, int, bytes]]) -> None:
    # One transaction per batch; rows apply in order, each against what the previous ones left, so
    # several records of one asset in a batch end with the newest whatever their order.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_UPSERT_POSITION, rows)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _select_position(conn: sqlite3.Connection, *, asset_id: str) -> bytes | None:
    row = conn.execute("SELECT record FROM last_positions WHERE asset_id = ?", (asset_id,)).fetchone()
    return None if row is None else bytes(row[0])


def _select_positions(conn: sqlite3.Connection, *, company_id: str) -> list[bytes]:
    cursor = conn.execute("SELECT record FROM last_positions WHERE company_id = ? ORDER BY asset_id", (company_id,))
    return [bytes(row[0]) for row in cursor]
