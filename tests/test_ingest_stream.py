"""The ``ingest`` stream consumer: driver positions from other sources go through the same pipeline onto the bus."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from gatewaykit import records_on, running_gateway

from gateway.bus.memory import MemoryBus
from gateway.bus.redis import RedisBus
from gateway.records import IngestPosition
from gateway.settings import BusSettings

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def driver_fix(i: int, speed: float) -> IngestPosition:
    t = T0 + timedelta(seconds=i)
    return IngestPosition(source="driver", asset_id="u1", company_id="acme", fix_time=t, received_at=t,
                          lat=54.68 + i * 0.0005, lng=25.28, speed_kmh=speed, course=0, display_name="Ann")  # fmt: skip


@pytest.mark.parametrize("driver", ["memory", "redis"])
async def test_driver_positions_are_enriched_committed_and_acked(
    tmp_path: Path, driver: str, request: pytest.FixtureRequest
) -> None:
    if driver == "redis":
        bus = RedisBus(BusSettings(driver="redis", redis_url=request.getfixturevalue("redis_url")))
    else:
        bus = MemoryBus(BusSettings())
    async with running_gateway(tmp_path, bus=bus) as gw:
        await bus.publish_ingest([driver_fix(0, 0.0), driver_fix(1, 30.0), driver_fix(1, 30.0)])
        first, second = await records_on(bus, 2)
        assert (first.asset_id, first.company_id, first.source, first.imei) == ("u1", "acme", "driver", "")
        assert (first.moving, second.moving) == (False, True)
        assert second.odometer_m is not None and 50 < second.odometer_m < 60  # integrated: 0.0005 deg of latitude
        await asyncio.sleep(0.2)
        assert await bus.length() == 2  # the repeated fix was a duplicate
        last = await gw.store.last_position("u1")
        assert last is not None and last.fix_time == second.fix_time
        assert await bus.pending("gateway", stream="ingest") == 0  # the consumer acked all three
    await bus.close()
