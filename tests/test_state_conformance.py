"""The state store contract, run against both drivers: SQLite (a file in tmp_path) and Redis (private server)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.records import Device, DeviceEvent, TrackedPosition, record_id
from gateway.settings import StateSettings
from gateway.state import StateStore, fix_time_ms, open_state
from gateway.state.sqlite import SqliteStateStore

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

OpenStore = Callable[[], StateStore]


@pytest.fixture(params=["sqlite", "redis"])
def settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> StateSettings:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("state") / "state.sqlite"
        return StateSettings(driver="sqlite", sqlite_path=str(path))
    return StateSettings(driver="redis", redis_url=request.getfixturevalue("redis_url"), prefix="conformance")


@pytest.fixture
async def reopen(settings: StateSettings) -> AsyncIterator[OpenStore]:
    """Opens another store on the same file / Redis; every one opened is closed after the test."""
    opened: list[StateStore] = []

    def open_one() -> StateStore:
        opened.append(open_state(settings))
        return opened[-1]

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
def store(reopen: OpenStore) -> StateStore:
    return reopen()


def device(imei: str, company: str = "acme", **fields: object) -> Device:
    values: dict[str, object] = {"asset_id": f"asset-{imei[-4:]}", "company_id": company, **fields}
    return Device(imei=imei, **values)  # type: ignore[arg-type]


def position(asset: str, company: str = "acme", seconds: float = 0, **fields: object) -> TrackedPosition:
    fix_time = T0 + timedelta(seconds=seconds)
    imei = fields.pop("imei", "356307042441013")
    values: dict[str, object] = {
        "display_name": f"Truck {asset}",
        "source": "gt06",
        "received_at": fix_time + timedelta(seconds=2),
        "lat": 52.5,
        "lng": 13.4,
        "speed_kmh": 42.0,
        "course": 90,
        "satellites": 9,
        "valid": True,
        "moving": True,
        **fields,
    }
    return TrackedPosition(
        id=record_id(str(imei), fix_time, "position"),
        kind="position",
        imei=str(imei),
        asset_id=asset,
        company_id=company,
        fix_time=fix_time,
        **values,  # type: ignore[arg-type]
    )


# -- devices -------------------------------------------------------------------


async def test_unknown_device_is_none(store: StateStore) -> None:
    assert await store.get_device("356307042441013") is None
    assert await store.list_devices() == []
    assert await store.list_devices("acme") == []


async def test_put_get_replace(store: StateStore) -> None:
    first = device("356307042441013", display_name="Truck 7", speed_limit_kmh=80.5, protocol="gt06")
    await store.put_device(first)
    assert await store.get_device(first.imei) == first
    plain = device("356307042441013")  # replacing drops the optional fields it leaves out
    await store.put_device(plain)
    assert await store.get_device(first.imei) == plain
    assert await store.list_devices() == [plain]


async def test_list_ordered_by_imei_and_filtered_by_company(store: StateStore) -> None:
    devices = [
        device("356307042441099", "acme"),
        device("123456789012345", "globex"),
        device("356307042441013", "acme"),
        device("869000000000001", "acme", protocol="teltonika"),
        device("356307042441050", "globex"),
    ]
    for d in devices:
        await store.put_device(d)
    assert await store.list_devices() == sorted(devices, key=lambda d: d.imei)
    assert [d.imei for d in await store.list_devices("acme")] == [
        "356307042441013",
        "356307042441099",
        "869000000000001",
    ]
    assert [d.imei for d in await store.list_devices("globex")] == ["123456789012345", "356307042441050"]
    assert await store.list_devices("initech") == []


async def test_device_moving_to_another_company(store: StateStore) -> None:
    await store.put_device(device("356307042441013", "acme"))
    moved = device("356307042441013", "globex")
    await store.put_device(moved)
    assert await store.list_devices("acme") == []
    assert await store.list_devices("globex") == [moved]
    assert await store.get_device(moved.imei) == moved


async def test_remove(store: StateStore) -> None:
    kept, gone = device("356307042441013"), device("356307042441021")
    await store.put_device(kept)
    await store.put_device(gone)
    assert await store.remove_device(gone.imei) is True
    assert await store.get_device(gone.imei) is None
    assert await store.list_devices() == [kept]
    assert await store.list_devices("acme") == [kept]
    assert await store.remove_device(gone.imei) is False
    assert await store.remove_device("999999999999999") is False


async def test_removed_device_can_be_added_again(store: StateStore) -> None:
    d = device("356307042441013")
    await store.put_device(d)
    await store.remove_device(d.imei)
    await store.put_device(d)
    assert await store.get_device(d.imei) == d
    assert await store.list_devices("acme") == [d]


# -- last positions --------------------------------------------------------------


async def test_newer_replaces_older_does_not(store: StateStore) -> None:
    first, newer, older = position("a1", seconds=10), position("a1", seconds=20), position("a1", seconds=15)
    await store.save_last_positions([first])
    assert await store.last_position("a1") == first
    await store.save_last_positions([newer])
    assert await store.last_position("a1") == newer
    await store.save_last_positions([older])
    assert await store.last_position("a1") == newer
    assert await store.last_positions("acme") == [newer]


async def test_equal_fix_time_later_write_wins(store: StateStore) -> None:
    fix = position("a1", seconds=10)
    alarm = position("a1", seconds=10, flags=("sos",))
    await store.save_last_positions([fix])
    await store.save_last_positions([alarm])
    assert await store.last_position("a1") == alarm


async def test_one_millisecond_is_newer(store: StateStore) -> None:
    earlier, later = position("a1", seconds=10), position("a1", seconds=10.001)
    await store.save_last_positions([later])
    await store.save_last_positions([earlier])
    assert await store.last_position("a1") == later


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
async def test_newest_of_a_batch_wins_in_any_order(store: StateStore, order: tuple[int, ...]) -> None:
    a = [position("a1", seconds=s) for s in (5, 30, 10)]
    b = [position("b1", seconds=s) for s in (50, 3, 7)]
    await store.save_last_positions([r for i in order for r in (a[i], b[i])])
    assert await store.last_position("a1") == a[1]
    assert await store.last_position("b1") == b[0]


async def test_batch_older_than_stored_is_ignored(store: StateStore) -> None:
    stored = position("a1", seconds=100)
    await store.save_last_positions([stored])
    await store.save_last_positions([position("a1", seconds=s) for s in (99, 50, 1)])
    assert await store.last_position("a1") == stored


async def test_empty_batch(store: StateStore) -> None:
    await store.save_last_positions([])
    assert await store.last_positions("acme") == []


async def test_last_positions_per_company_ordered_and_isolated(store: StateStore) -> None:
    acme = [position(asset, "acme", seconds=i) for i, asset in enumerate(["truck-9", "truck-10", "van-1", "Bus"])]
    globex = [position(asset, "globex") for asset in ("g-2", "g-1")]
    await store.save_last_positions([*acme, *globex])
    assert [r.asset_id for r in await store.last_positions("acme")] == ["Bus", "truck-10", "truck-9", "van-1"]
    assert await store.last_positions("globex") == sorted(globex, key=lambda r: r.asset_id)
    assert await store.last_positions("initech") == []
    assert await store.last_position("nobody") is None


async def test_asset_moving_to_another_company(store: StateStore) -> None:
    await store.save_last_positions([position("a1", "acme", seconds=1)])
    moved = position("a1", "globex", seconds=2)
    await store.save_last_positions([moved])
    assert await store.last_positions("acme") == []
    assert await store.last_positions("globex") == [moved]
    assert await store.last_position("a1") == moved


async def test_records_round_trip_exactly(store: StateStore) -> None:
    full = position(
        "a1",
        seconds=0.123456,
        imei="869000000000001",
        source="teltonika",
        altitude=-12,
        ignition=True,
        odometer_m=123_456_789,
        external_voltage=12.6,
        battery_voltage=4.05,
        gsm_signal=4,
        address="Unter den Linden 1, Berlin",
        flags=("future_fix", "jump"),
        events=(
            DeviceEvent(kind="alarm", name="sos", code=1),
            DeviceEvent(kind="io", name="io_247", code=247, value=1),
        ),
        io={1: 1, 66: 12600, 240: 0, 387: "ICCID-89490200001234567890"},
        lat=-33.8688197,
        lng=151.2092955,
        speed_kmh=0.0,
        valid=False,
        moving=False,
    )
    minimal = position("a2", seconds=1)
    await store.save_last_positions([full, minimal])
    got = await store.last_position("a1")
    assert got == full
    assert got is not None and got.io == full.io and got.fix_time == full.fix_time
    assert await store.last_position("a2") == minimal


async def test_persists_across_reopen(store: StateStore, reopen: OpenStore) -> None:
    d = device("356307042441013", display_name="Truck 7", speed_limit_kmh=90.0, protocol="teltonika")
    await store.put_device(d)
    await store.put_device(device("356307042441021"))
    await store.remove_device("356307042441021")
    newest = position("a1", seconds=20)
    await store.save_last_positions([newest, position("a1", seconds=10)])
    await store.close()

    again = reopen()
    assert await again.get_device(d.imei) == d
    assert await again.list_devices("acme") == [d]
    assert await again.last_positions("acme") == [newest]
    await again.save_last_positions([position("a1", seconds=15)])
    assert await again.last_position("a1") == newest


# -- the SQLite driver: memory databases, the device cache and other processes ------------------


def test_fix_time_ms_is_exact() -> None:
    assert fix_time_ms(datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)) == 1772366400123
    assert fix_time_ms(datetime(2026, 3, 1, 12, 0, 0, 123999, tzinfo=UTC)) == 1772366400123
    assert fix_time_ms(datetime(2026, 3, 1, 12, 0, 0, 123000)) == 1772366400123  # naive counts as UTC
    assert fix_time_ms(datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)) == -1


async def test_sqlite_memory_database() -> None:
    store = open_state(StateSettings(driver="sqlite", sqlite_path=":memory:"))
    assert isinstance(store, SqliteStateStore)
    try:
        await store.put_device(device("356307042441013"))
        assert [d.imei for d in await store.list_devices()] == ["356307042441013"]
    finally:
        await store.close()


async def test_sqlite_cache_sees_other_connections(tmp_path: Path) -> None:
    settings = StateSettings(driver="sqlite", sqlite_path=str(tmp_path / "state.sqlite"))
    gateway, cli = SqliteStateStore(settings), SqliteStateStore(settings)
    try:
        imei = "356307042441013"
        assert await gateway.get_device(imei) is None
        await cli.put_device(device(imei, display_name="new"))
        assert (await gateway.get_device(imei)) == device(imei, display_name="new")  # unknowns are not cached

        await cli.put_device(device(imei, display_name="renamed"))
        await gateway.save_last_positions([position("a1")])  # any call notices the other connection's commit
        assert (await gateway.get_device(imei)) == device(imei, display_name="renamed")

        await cli.remove_device(imei)
        await gateway.last_position("a1")
        assert await gateway.get_device(imei) is None
    finally:
        await gateway.close()
        await cli.close()


async def test_sqlite_cache_entries_expire(tmp_path: Path) -> None:
    settings = StateSettings(driver="sqlite", sqlite_path=str(tmp_path / "state.sqlite"))
    cli = SqliteStateStore(settings)
    long_lived = SqliteStateStore(settings, device_cache_ttl_s=3600)
    short_lived = SqliteStateStore(settings, device_cache_ttl_s=0)
    try:
        imei = "356307042441013"
        await cli.put_device(device(imei, display_name="old"))
        assert await long_lived.get_device(imei) == device(imei, display_name="old")
        assert await short_lived.get_device(imei) == device(imei, display_name="old")
        await cli.put_device(device(imei, display_name="new"))
        # Without any other call the long-lived cache has not looked at the file again: the TTL bounds that.
        assert await long_lived.get_device(imei) == device(imei, display_name="old")
        assert await short_lived.get_device(imei) == device(imei, display_name="new")
    finally:
        for store in (cli, long_lived, short_lived):
            await store.close()


async def test_sqlite_own_writes_invalidate_cache(tmp_path: Path) -> None:
    store = SqliteStateStore(StateSettings(sqlite_path=str(tmp_path / "state.sqlite")), device_cache_ttl_s=3600)
    try:
        imei = "356307042441013"
        await store.put_device(device(imei, display_name="old"))
        assert await store.get_device(imei) == device(imei, display_name="old")
        await store.put_device(device(imei, display_name="new"))
        assert await store.get_device(imei) == device(imei, display_name="new")
        await store.remove_device(imei)
        assert await store.get_device(imei) is None
    finally:
        await store.close()
