"""The link store contract, run against both drivers: SQLite (a file in tmp_path) and Redis (private server)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_sync
from servers import free_port

from gateway.settings import StateSettings
from gateway.state.sqlite import SqliteStateStore
from relay.links.model import Arrival, EmailCode, LinkSession, Schedule, ScheduleWindow, TrackingLink
from relay.links.store import LinkStore, LinkStoreError, open_link_store
from relay.links.store_redis import RedisLinkStore
from relay.links.store_sqlite import SqliteLinkStore

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

OpenStore = Callable[[], LinkStore]


@pytest.fixture(params=["sqlite", "redis"])
def driver_args(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {"driver": "sqlite", "sqlite_path": str(tmp_path / "state.sqlite"), "redis_url": "", "prefix": ""}
    url = request.getfixturevalue("redis_url")
    return {"driver": "redis", "sqlite_path": "", "redis_url": url, "prefix": "conformance"}


@pytest.fixture
async def reopen(driver_args: dict[str, str]) -> AsyncIterator[OpenStore]:
    """Opens another store on the same file / Redis; every one opened is closed after the test."""
    opened: list[LinkStore] = []

    def open_one() -> LinkStore:
        opened.append(open_link_store(**driver_args))
        return opened[-1]

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
def store(reopen: OpenStore) -> LinkStore:
    return reopen()


def link(
    uuid: str, company: str = "acme", asset: str = "truck-7", seconds: float = 0, **fields: object
) -> TrackingLink:
    created = T0 + timedelta(seconds=seconds)
    values: dict[str, object] = {"display_name": f"Delivery {uuid}", "created_at": created, "updated_at": created}
    values.update(fields)
    return TrackingLink(uuid=uuid, company_id=company, asset_id=asset, **values)  # type: ignore[arg-type]


def session(token_hash: str, link_uuid: str, ttl_s: float = 3600, **fields: object) -> LinkSession:
    now = datetime.now(UTC)
    return LinkSession(
        token_hash=token_hash,
        link_uuid=link_uuid,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
        **fields,  # type: ignore[arg-type]
    )


def code(link_uuid: str, email: str, code_hash: str = "h1", ttl_s: float = 600, **fields: object) -> EmailCode:
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl_s)
    return EmailCode(link_uuid=link_uuid, email=email, code_hash=code_hash, expires_at=expires_at, **fields)  # type: ignore[arg-type]


# -- links ------------------------------------------------------------------------


async def test_unknown_is_none_or_empty(store: LinkStore) -> None:
    assert await store.get_link("nope") is None
    assert await store.list_links("acme") == []
    assert await store.links_for_asset("truck-7") == []
    assert await store.delete_link("nope") is False
    assert await store.get_session("0" * 64) is None
    assert await store.delete_sessions("nope") == 0
    assert await store.get_code("nope", "a@example.com") is None
    await store.delete_code("nope", "a@example.com")


async def test_put_get_replace(store: LinkStore) -> None:
    full = link("l1", job_id="job-1", access_mode="email", expires_at=T0 + timedelta(hours=8), session_ttl_s=60)
    await store.put_link(full)
    assert await store.get_link("l1") == full
    plain = link("l1")  # replacing drops the optional fields it leaves out
    await store.put_link(plain)
    assert await store.get_link("l1") == plain
    assert await store.list_links("acme") == [plain]
    assert await store.links_for_asset("truck-7") == [plain]


async def test_delete(store: LinkStore) -> None:
    kept, gone = link("l1"), link("l2", seconds=1)
    await store.put_link(kept)
    await store.put_link(gone)
    assert await store.delete_link("l2") is True
    assert await store.get_link("l2") is None
    assert await store.list_links("acme") == [kept]
    assert await store.links_for_asset("truck-7") == [kept]
    assert await store.delete_link("l2") is False
    await store.put_link(gone)  # a deleted uuid can be put again
    assert await store.list_links("acme") == [gone, kept]


async def test_list_newest_first_and_per_company(store: LinkStore) -> None:
    acme = [link("a-old", seconds=-3600), link("a-new", seconds=60), link("a-mid", seconds=0.000001)]
    globex = [link("g-1", "globex", seconds=5), link("g-2", "globex", seconds=1)]
    for each in (*acme, *globex):
        await store.put_link(each)
    assert [x.uuid for x in await store.list_links("acme")] == ["a-new", "a-mid", "a-old"]
    assert [x.uuid for x in await store.list_links("globex")] == ["g-1", "g-2"]
    assert await store.list_links("initech") == []


async def test_equal_creation_times_order_the_same_in_both_drivers(store: LinkStore) -> None:
    for uuid in ("b", "c", "a"):
        await store.put_link(link(uuid))
    assert [x.uuid for x in await store.list_links("acme")] == ["c", "b", "a"]
    assert [x.uuid for x in await store.links_for_asset("truck-7")] == ["c", "b", "a"]


async def test_links_for_asset_follow_reassignment(store: LinkStore) -> None:
    job = link("job-link", asset="truck-7", job_id="job-1")
    other = link("other", asset="truck-7", seconds=1)
    await store.put_link(job)
    await store.put_link(other)
    assert [x.uuid for x in await store.links_for_asset("truck-7")] == ["other", "job-link"]

    moved = link("job-link", asset="truck-9", job_id="job-1", display_name="Delivery (new truck)")
    await store.put_link(moved)
    assert await store.links_for_asset("truck-7") == [other]
    assert await store.links_for_asset("truck-9") == [moved]
    assert [x.uuid for x in await store.list_links("acme")] == ["other", "job-link"]


async def test_link_moving_to_another_company(store: LinkStore) -> None:
    await store.put_link(link("l1", "acme"))
    moved = link("l1", "globex")
    await store.put_link(moved)
    assert await store.list_links("acme") == []
    assert await store.list_links("globex") == [moved]


async def test_records_round_trip_exactly(store: LinkStore) -> None:
    full = link(
        "l1",
        access_mode="authorized_only",
        allowed_emails=("a@example.com", "b@example.org"),
        job_id="job-42",
        expires_at=datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=UTC),
        arrival=Arrival(lat=-33.8688197, lng=151.2092955, radius_m=75.5),
        schedule=Schedule(
            timezone="Europe/Berlin",
            windows=(
                ScheduleWindow(days=(0, 1, 2, 3, 4), start="08:00", end="18:30"),
                ScheduleWindow(days=(5,), start="00:00", end="24:00"),
            ),
        ),
        session_ttl_s=900,
        enabled=False,
        updated_at=T0 + timedelta(microseconds=1),
        expired_at=T0 + timedelta(days=1),
        expired_reason="arrival",
    )
    await store.put_link(full)
    got = await store.get_link("l1")
    assert got == full
    assert got is not None and got.schedule == full.schedule and got.arrival == full.arrival
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert (await store.list_links("acme")) == [full]

    viewer = session("f" * 64, "l1", email="a@example.com")
    await store.put_session(viewer)
    assert await store.get_session(viewer.token_hash) == viewer
    pending = code("l1", "a@example.com", attempts_left=3)
    await store.put_code(pending)
    assert await store.get_code("l1", "a@example.com") == pending


async def test_persists_across_reopen(store: LinkStore, reopen: OpenStore) -> None:
    kept = link("l1", arrival=Arrival(lat=52.5, lng=13.4))
    await store.put_link(kept)
    viewer = session("a" * 64, "l1")
    await store.put_session(viewer)
    await store.close()

    again = reopen()
    assert await again.get_link("l1") == kept
    assert await again.get_session(viewer.token_hash) == viewer


async def test_closed_store_raises(store: LinkStore) -> None:
    await store.put_link(link("l1"))
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(RuntimeError):
        await store.get_link("l1")
    with pytest.raises(RuntimeError):
        await store.put_session(session("a" * 64, "l1"))


# -- sessions -------------------------------------------------------------------------


async def test_session_put_get_and_isolation(store: LinkStore) -> None:
    mine, theirs = session("a" * 64, "l1"), session("b" * 64, "l2")
    await store.put_session(mine)
    await store.put_session(theirs)
    assert await store.get_session(mine.token_hash) == mine
    assert await store.get_session(theirs.token_hash) == theirs
    assert await store.get_session("c" * 64) is None


async def test_session_born_expired_is_never_returned(store: LinkStore) -> None:
    await store.put_session(session("a" * 64, "l1", ttl_s=-1))
    assert await store.get_session("a" * 64) is None
    live = session("b" * 64, "l1")
    await store.put_session(live)
    await store.put_session(session("b" * 64, "l1", ttl_s=-1))  # replacing with an expired one ends it
    assert await store.get_session("b" * 64) is None
    assert await store.delete_sessions("l1") == 0


async def test_session_expires(store: LinkStore) -> None:
    short, long = session("a" * 64, "l1", ttl_s=0.3), session("b" * 64, "l1")
    await store.put_session(short)
    await store.put_session(long)
    assert await store.get_session(short.token_hash) == short
    await asyncio.sleep(0.35)
    assert await store.get_session(short.token_hash) is None
    assert await store.get_session(long.token_hash) == long
    assert await store.delete_sessions("l1") == 1  # only live sessions count


async def test_delete_sessions(store: LinkStore) -> None:
    for i in range(3):
        await store.put_session(session(f"{i}" * 64, "l1"))
    other = session("x" * 64, "l2")
    await store.put_session(other)
    assert await store.delete_sessions("l1") == 3
    assert [await store.get_session(f"{i}" * 64) for i in range(3)] == [None, None, None]
    assert await store.get_session(other.token_hash) == other
    assert await store.delete_sessions("l1") == 0


# -- codes ------------------------------------------------------------------------------


async def test_codes_replace_per_link_and_email(store: LinkStore) -> None:
    first = code("l1", "a@example.com", "h1")
    await store.put_code(first)
    await store.put_code(code("l1", "b@example.com", "h2"))
    await store.put_code(code("l2", "a@example.com", "h3"))
    tried = code("l1", "a@example.com", "h1", attempts_left=4)
    await store.put_code(tried)
    assert await store.get_code("l1", "a@example.com") == tried
    assert (await store.get_code("l1", "b@example.com") or first).code_hash == "h2"
    assert (await store.get_code("l2", "a@example.com") or first).code_hash == "h3"

    await store.delete_code("l1", "a@example.com")
    assert await store.get_code("l1", "a@example.com") is None
    assert await store.get_code("l1", "b@example.com") is not None


async def test_code_expires(store: LinkStore) -> None:
    await store.put_code(code("l1", "gone@example.com", ttl_s=-5))
    assert await store.get_code("l1", "gone@example.com") is None
    short = code("l1", "a@example.com", ttl_s=0.3)
    await store.put_code(short)
    assert await store.get_code("l1", "a@example.com") == short
    await asyncio.sleep(0.35)
    assert await store.get_code("l1", "a@example.com") is None


async def test_delete_link_ends_sessions_and_codes(store: LinkStore) -> None:
    await store.put_link(link("l1"))
    await store.put_link(link("l2"))
    await store.put_session(session("a" * 64, "l1"))
    await store.put_session(session("b" * 64, "l1", email="a@example.com"))
    await store.put_code(code("l1", "a@example.com"))
    await store.put_code(code("l1", "b@example.com"))
    kept_session, kept_code = session("c" * 64, "l2"), code("l2", "a@example.com")
    await store.put_session(kept_session)
    await store.put_code(kept_code)

    assert await store.delete_link("l1") is True
    assert await store.get_session("a" * 64) is None
    assert await store.get_session("b" * 64) is None
    assert await store.get_code("l1", "a@example.com") is None
    assert await store.get_code("l1", "b@example.com") is None
    assert await store.delete_sessions("l1") == 0
    assert await store.get_session("c" * 64) == kept_session
    assert await store.get_code("l2", "a@example.com") == kept_code


# -- driver specifics -------------------------------------------------------------------


def test_unknown_driver() -> None:
    with pytest.raises(ValueError, match="memcached"):
        open_link_store("memcached", sqlite_path="", redis_url="", prefix="")


async def test_redis_unreachable_is_link_store_error() -> None:
    store = RedisLinkStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
    try:
        calls = [
            store.get_link("l1"),
            store.put_link(link("l1")),
            store.delete_link("l1"),
            store.list_links("acme"),
            store.links_for_asset("truck-7"),
            store.put_session(session("a" * 64, "l1")),
            store.get_session("a" * 64),
            store.delete_sessions("l1"),
            store.put_code(code("l1", "a@example.com")),
            store.get_code("l1", "a@example.com"),
            store.delete_code("l1", "a@example.com"),
        ]
        for call in calls:
            with pytest.raises(LinkStoreError):
                await call
    finally:
        await store.close()


async def test_redis_keys_expire_and_indexes_stay_small(redis_url: str) -> None:
    store = RedisLinkStore(redis_url, "ttl")
    client = redis_sync.Redis.from_url(redis_url)
    try:
        await store.put_session(session("old" + "0" * 61, "l1", ttl_s=0.05))
        await store.put_code(code("l1", "a@example.com", ttl_s=120))
        await asyncio.sleep(0.1)
        await store.put_session(session("a" * 64, "l1", ttl_s=60))
        assert 59_000 < client.pttl("ttl:link-session:" + "a" * 64) <= 60_000
        assert 119_000 < client.pttl("ttl:link-code:l1:a@example.com") <= 120_000
        assert client.zrange("ttl:link-sessions:l1", 0, -1) == [b"a" * 64]  # the expired hash was dropped
        assert 59_000 < client.pttl("ttl:link-sessions:l1") <= 60_000  # the index goes with its last session
        await store.delete_link("l1")
        assert client.keys("ttl:*") == []
    finally:
        client.close()
        await store.close()


async def test_sqlite_purges_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = SqliteLinkStore(str(path))
    try:
        await store.put_session(session("a" * 64, "l1", ttl_s=0.05))
        await store.put_code(code("l1", "a@example.com", ttl_s=0.05))
        await asyncio.sleep(0.1)
        await store.put_session(session("b" * 64, "l1"))
        await store.put_code(code("l1", "b@example.com"))
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT token_hash FROM tracking_link_sessions").fetchall() == [("b" * 64,)]
            assert conn.execute("SELECT email FROM tracking_link_codes").fetchall() == [("b@example.com",)]
    finally:
        await store.close()


async def test_sqlite_shares_the_gateway_state_file(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite")
    state, links = SqliteStateStore(StateSettings(sqlite_path=path)), SqliteLinkStore(path)
    try:
        assert await state.list_devices() == []
        await links.put_link(link("l1"))
        assert await state.list_devices() == []
        assert [x.uuid for x in await links.list_links("acme")] == ["l1"]
    finally:
        await state.close()
        await links.close()


async def test_sqlite_unavailable_is_link_store_error(tmp_path: Path) -> None:
    store = SqliteLinkStore(str(tmp_path / "missing-directory" / "state.sqlite"))
    try:
        with pytest.raises(LinkStoreError):
            await store.get_link("l1")
    finally:
        await store.close()
