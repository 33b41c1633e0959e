"""One conformance suite for both bus drivers: every test runs against MemoryBus and RedisBus.

Redis runs as the private session server from ``conftest.py`` (flushed per
test). Driver-specific behaviour (Redis failures, script reloading, the
in-memory dedup cap) is tested at the end, on the driver it concerns.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis as redis_sync
from servers import free_port, redis_server

from gateway.bus import Bus, BusError, MemoryBus, RedisBus, open_bus
from gateway.records import DeviceEvent, IngestPosition, TrackedPosition, record_id
from gateway.settings import BusSettings

T = TypeVar("T")
BASE = datetime(2026, 1, 1, tzinfo=UTC)
IMEI = "356307042441013"
MakeBus = Callable[..., Bus]


def position(n: int, *, imei: str = IMEI, kind: str = "position") -> TrackedPosition:
    """The ``n``-th fix of a device, one second apart: distinct ``n`` give distinct record ids."""
    t = BASE + timedelta(seconds=n)
    return TrackedPosition(
        id=record_id(imei, t, kind), kind=kind, imei=imei, asset_id="truck-1", company_id="acme",
        display_name="", source="teltonika", fix_time=t, received_at=t + timedelta(seconds=2),
        lat=54.6872 + n * 1e-5, lng=25.2797, speed_kmh=0.0, course=0, satellites=5, valid=True, moving=False,
    )  # fmt: skip


def full_position() -> TrackedPosition:
    """A record with every optional field set, to check the encoding round trip."""
    t = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    return TrackedPosition(
        id=record_id(IMEI, t, "alarm"), kind="alarm", imei=IMEI, asset_id="truck-7", company_id="acme",
        display_name="Truck 7 — Vilnius", source="gt06", fix_time=t, received_at=t + timedelta(milliseconds=350),
        lat=-33.868820, lng=151.209296, speed_kmh=87.5, course=359, satellites=12, valid=False, moving=True,
        altitude=-12, ignition=True, odometer_m=123_456_789, external_voltage=12.64, battery_voltage=4.1,
        gsm_signal=4, address="George St", flags=("time_future", "jump"),
        events=(DeviceEvent(kind="alarm", name="sos", code=1),
                DeviceEvent(kind="io", name="io_247", code=247, value=2)),
        io={239: 1, 66: 12640, 256: "WDB1234567", 78: 0x1122334455667788},
    )  # fmt: skip


def ingest_item(n: int) -> IngestPosition:
    t = BASE + timedelta(seconds=n)
    return IngestPosition(
        source="driver", asset_id=f"user-{n}", company_id="acme", fix_time=t, received_at=t,
        lat=1.5 + n, lng=2.5, speed_kmh=3.0, course=90, display_name="Ann", accuracy_m=4.5,
    )  # fmt: skip


def entry_order(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


async def take(iterator: AsyncIterator[T], n: int, timeout: float = 5.0) -> list[T]:
    """The first ``n`` items of ``iterator`` (fewer if it ends), then close it."""
    out: list[T] = []
    try:
        async with asyncio.timeout(timeout):
            async for item in iterator:
                out.append(item)
                if len(out) == n:
                    break
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]
    return out


async def retained(bus: Bus) -> list[tuple[str, TrackedPosition]]:
    """Everything the ``positions`` stream holds, oldest first."""
    return await take(bus.tail(after="0"), await bus.length())


@pytest.fixture(params=["memory", "redis"])
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[MakeBus]:
    """Opens buses of one driver with settings overrides; closes them after the test."""
    driver = request.param
    url = request.getfixturevalue("redis_url") if driver == "redis" else ""
    opened: list[Bus] = []

    def make(**overrides: Any) -> Bus:
        opened.append(open_bus(BusSettings(driver=driver, redis_url=url, **overrides)))
        return opened[-1]

    yield make
    for bus in opened:
        await bus.close()


@pytest.fixture
def bus(make_bus: MakeBus) -> Bus:
    return make_bus()


# --------------------------------------------------------------------------
# positions: publish, tail


async def test_publish_flags_and_tail_in_order(bus: Bus) -> None:
    records = [position(n) for n in range(10)]
    assert await bus.publish(records) == [True] * 10
    assert await bus.publish([]) == []
    entries = await retained(bus)
    assert [record for _, record in entries] == records
    ids = [entry for entry, _ in entries]
    assert ids == sorted(ids, key=entry_order) and len(set(ids)) == 10
    assert await bus.length() == 10


async def test_records_round_trip_exactly(bus: Bus) -> None:
    record = full_position()
    assert await bus.publish([record]) == [True]
    [(_, tailed)] = await retained(bus)
    [(_, grouped)] = await bus.read_group("downstream", "c1", block_ms=0)
    assert tailed == record and grouped == record


async def test_tail_dollar_sees_only_new_records(bus: Bus) -> None:
    await bus.publish([position(n) for n in range(5)])
    tail = asyncio.create_task(take(bus.tail(), 3))
    await asyncio.sleep(0.2)  # the Redis driver pins "$" at its first round trip
    new = [position(n) for n in range(100, 103)]
    await bus.publish(new)
    assert [record for _, record in await tail] == new


async def test_tail_outlives_a_quiet_period(bus: Bus) -> None:
    tail = asyncio.create_task(take(bus.tail(), 1))
    await asyncio.sleep(1.3)  # longer than one blocking read of the Redis driver (TAIL_BLOCK_MS)
    assert not tail.done()
    record = position(7)
    await bus.publish([record])
    assert [r for _, r in await asyncio.wait_for(tail, 3.0)] == [record]


async def test_tail_after_an_entry_id_resumes_after_it(bus: Bus) -> None:
    records = [position(n) for n in range(6)]
    await bus.publish(records)
    entries = await retained(bus)
    resumed = await take(bus.tail(after=entries[2][0]), 3)
    assert resumed == entries[3:]


async def test_concurrent_tails_each_see_every_record(bus: Bus) -> None:
    records = [position(n) for n in range(300)]
    tails = [asyncio.create_task(take(bus.tail(after="0"), len(records))) for _ in range(5)]
    for start in range(0, len(records), 50):
        await bus.publish(records[start : start + 50])
        await asyncio.sleep(0)
    for tail in tails:
        assert [record for _, record in await tail] == records


async def test_close_ends_tails_and_fails_reads_and_writes(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.publish([position(0)])
    tail = asyncio.create_task(take(bus.tail(after="0"), 10))
    reader = asyncio.create_task(bus.read_group("archive", "c1", block_ms=0))
    assert len(await reader) == 1
    blocked = asyncio.create_task(bus.read_group("archive", "c1", block_ms=3000))
    await asyncio.sleep(0.2)
    await bus.close()
    assert [record for _, record in await asyncio.wait_for(tail, 3)] == [position(0)]
    with pytest.raises(BusError):
        await asyncio.wait_for(blocked, 3)
    with pytest.raises(BusError):
        await bus.publish([position(1)])
    with pytest.raises(BusError):
        await bus.publish_ingest([ingest_item(1)])
    with pytest.raises(BusError):
        await bus.read_ingest("gateway", "g1", block_ms=0)


# --------------------------------------------------------------------------
# dedup


async def test_duplicates_within_and_across_batches_are_dropped(bus: Bus) -> None:
    a, b, c = position(1), position(2), position(3)
    assert await bus.publish([a, b, a]) == [True, True, False]
    assert await bus.publish([b, c, c]) == [False, True, False]
    # Same fix time, other kind or other device: a different record.
    alarm, other = position(1, kind="alarm"), position(1, imei="356307042441014")
    assert await bus.publish([alarm, other]) == [True, True]
    assert [record for _, record in await retained(bus)] == [a, b, c, alarm, other]


async def test_replaying_three_times_yields_one_record_each(bus: Bus) -> None:
    records = [position(n) for n in range(50)]
    flags = [await bus.publish(records) for _ in range(3)]
    assert flags == [[True] * 50, [False] * 50, [False] * 50]
    assert [record for _, record in await retained(bus)] == records


async def test_dedup_window_expires(make_bus: MakeBus, request: pytest.FixtureRequest) -> None:
    bus = make_bus(dedup_window_s=1)
    record = position(1)
    assert await bus.publish([record]) == [True]
    assert await bus.publish([record]) == [False]
    if isinstance(bus, RedisBus):
        with redis_sync.Redis.from_url(request.getfixturevalue("redis_url")) as raw:
            assert 0 < raw.pttl(f"fleetgate:dedup:{record.id}") <= 1000
    await asyncio.sleep(1.2)
    assert await bus.publish([record]) == [True]
    assert await bus.length() == 2


# --------------------------------------------------------------------------
# bounds


async def test_maxlen_bounds_the_positions_stream(make_bus: MakeBus) -> None:
    bus = make_bus(positions_maxlen=100)
    records = [position(n) for n in range(5000)]
    for start in range(0, len(records), 500):
        await bus.publish(records[start : start + 500])
    length = await bus.length()
    # Redis trims whole radix-tree nodes (``MAXLEN ~``, 100 entries per node by default).
    assert 100 <= length <= 200
    assert [record for _, record in await retained(bus)] == records[-length:]


# --------------------------------------------------------------------------
# consumer groups


async def test_group_delivers_each_record_once_per_group(bus: Bus) -> None:
    records = [position(n) for n in range(20)]
    await bus.publish(records)
    first = await bus.read_group("archive", "c1", count=100, block_ms=0)
    assert [record for _, record in first] == records
    assert await bus.read_group("archive", "c1", block_ms=100) == []
    second = await bus.read_group("billing", "c1", count=100, block_ms=0)
    assert second == first


async def test_group_consumers_split_the_records(bus: Bus) -> None:
    await bus.publish([position(n) for n in range(10)])
    one = await bus.read_group("archive", "c1", count=4, block_ms=0)
    two = await bus.read_group("archive", "c2", count=100, block_ms=0)
    assert len(one) == 4 and len(two) == 6
    assert {entry for entry, _ in one}.isdisjoint(entry for entry, _ in two)


async def test_ack_clears_pending(bus: Bus) -> None:
    await bus.publish([position(n) for n in range(5)])
    entries = await bus.read_group("archive", "c1", block_ms=0)
    assert await pending(bus, "archive") == 5
    await bus.ack("archive", [entry for entry, _ in entries[:2]])
    assert await pending(bus, "archive") == 3
    await bus.ack("archive", [entry for entry, _ in entries])
    assert await pending(bus, "archive") == 0


async def test_read_group_wakes_on_publish(bus: Bus) -> None:
    await bus.read_group("archive", "c1", block_ms=0)  # the group starts before the record
    reader = asyncio.create_task(bus.read_group("archive", "c1", block_ms=3000))
    await asyncio.sleep(0.1)
    await bus.publish([position(1)])
    assert [record for _, record in await asyncio.wait_for(reader, 2)] == [position(1)]


# --------------------------------------------------------------------------
# ingest


async def test_ingest_round_trip_through_groups(bus: Bus) -> None:
    items = [ingest_item(n) for n in range(5)]
    await bus.publish_ingest(items)
    await bus.publish_ingest([])
    got = await bus.read_ingest("gateway", "g1", block_ms=0)
    assert [item for _, item in got] == items
    assert await bus.read_ingest("gateway", "g1", block_ms=0) == []
    await bus.ack_ingest("gateway", [entry for entry, _ in got])
    assert [item for _, item in await bus.read_ingest("audit", "a1", block_ms=0)] == items
    assert await bus.length() == 0  # ingest items never land on positions


async def test_read_ingest_wakes_on_publish(bus: Bus) -> None:
    reader = asyncio.create_task(bus.read_ingest("gateway", "g1", block_ms=3000))
    await asyncio.sleep(0.1)
    await bus.publish_ingest([ingest_item(1)])
    assert [item for _, item in await asyncio.wait_for(reader, 2)] == [ingest_item(1)]


# --------------------------------------------------------------------------
# driver-specific


async def test_memory_dedup_is_capped_oldest_first() -> None:
    bus = MemoryBus(BusSettings(memory_dedup_max=3))
    records = [position(n) for n in range(4)]
    assert await bus.publish(records) == [True] * 4
    assert await bus.publish(records[1:]) == [False] * 3
    assert await bus.publish(records[:1]) == [True]  # evicted by the cap, not yet by time


async def test_redis_unreachable_raises_bus_error() -> None:
    bus = RedisBus(BusSettings(driver="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(BusError):
            await bus.connect()
        with pytest.raises(BusError):
            await bus.publish([position(1)])
        with pytest.raises(BusError):
            await bus.read_group("archive", "c1", block_ms=0)
        with pytest.raises(BusError):
            await bus.publish_ingest([ingest_item(1)])
        with pytest.raises(BusError):
            await take(bus.tail(), 1)
    finally:
        await bus.close()


async def test_redis_killed_mid_run_raises_bus_error(tmp_path: Path) -> None:
    server = redis_server(tmp_path, appendonly=False).start()
    bus = RedisBus(BusSettings(driver="redis", redis_url=f"redis://127.0.0.1:{server.port}/0"))
    try:
        assert await bus.publish([position(1)]) == [True]
        tail = asyncio.create_task(take(bus.tail(after="0"), 10))
        await asyncio.sleep(0.2)
        server.kill()
        with pytest.raises(BusError):
            await bus.publish([position(2)])
        with pytest.raises(BusError):
            await tail
        with pytest.raises(BusError):
            await bus.length()
    finally:
        server.kill()
        await bus.close()


async def test_redis_publish_reloads_a_flushed_script(redis_url: str) -> None:
    bus = RedisBus(BusSettings(driver="redis", redis_url=redis_url))
    try:
        assert await bus.publish([position(1)]) == [True]
        with redis_sync.Redis.from_url(redis_url) as raw:
            raw.script_flush()
        assert await bus.publish([position(1), position(2)]) == [False, True]
    finally:
        await bus.close()


async def test_redis_restarted_consumer_gets_its_unacked_records_back(redis_url: str) -> None:
    settings = BusSettings(driver="redis", redis_url=redis_url)
    first, second = RedisBus(settings), RedisBus(settings)
    try:
        await first.publish([position(n) for n in range(5)])
        delivered = await first.read_group("archive", "c1", count=3, block_ms=0)
        await first.ack("archive", [delivered[0][0]])
        # A new process under the same consumer name: its backlog, then what is new.
        assert await second.read_group("archive", "c1", block_ms=0) == delivered[1:]
        assert [record for _, record in await second.read_group("archive", "c1", block_ms=0)] == [
            position(3),
            position(4),
        ]
    finally:
        await first.close()
        await second.close()


# --------------------------------------------------------------------------


async def pending(bus: Bus, group: str) -> int:
    """Unacknowledged entries of ``group``: both drivers expose this beside the contract."""
    assert isinstance(bus, MemoryBus | RedisBus)
    return await bus.pending(group)
