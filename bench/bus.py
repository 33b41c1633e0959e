"""Bus publish throughput, printed as JSON.

For each driver and batch size, ``publish`` is called with batches of fresh
records (every one written: dedup check, msgpack, append) and then with the
same batches again (every one a duplicate). Redis runs as a private
redis-server on a free loopback port, by default with the AOF fsynced on every
write (``appendfsync always``, the durability the gateway's ACKs rely on);
``--no-aof`` measures without it. One client, one batch in flight at a time,
as the committer sends them.

    python bench/bus.py [--records 200000] [--batches 500,1000,2000] [--no-aof] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # servers.py: the private redis-server of the tests

from servers import redis_server  # noqa: E402

from gateway.bus import Bus, MemoryBus, RedisBus  # noqa: E402
from gateway.records import TrackedPosition, record_id  # noqa: E402
from gateway.settings import BusSettings  # noqa: E402

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def records(count: int, imei_base: int) -> list[TrackedPosition]:
    """``count`` distinct records spread over 1000 devices, shaped like a Teltonika fix with a few IO values."""
    out = []
    for n in range(count):
        imei = str(imei_base + n % 1000)
        t = BASE + timedelta(seconds=n // 1000)
        out.append(
            TrackedPosition(
                id=record_id(imei, t, "position"),
                kind="position",
                imei=imei,
                asset_id=f"asset-{n % 1000}",
                company_id="acme",
                display_name=f"Truck {n % 1000}",
                source="teltonika",
                fix_time=t,
                received_at=t + timedelta(seconds=1),
                lat=54.68 + n * 1e-7,
                lng=25.27,
                speed_kmh=42.0,
                course=180,
                satellites=11,
                valid=True,
                moving=True,
                altitude=120,
                ignition=True,
                odometer_m=1_234_567 + n,
                external_voltage=12.6,
                io={239: 1, 240: 1, 21: 4, 66: 12600},
            )
        )
    return out


async def publish_rate(bus: Bus, batches: Sequence[Sequence[TrackedPosition]]) -> float:
    total = sum(len(batch) for batch in batches)
    start = time.perf_counter()
    for batch in batches:
        await bus.publish(batch)
    return total / (time.perf_counter() - start)


async def bench_driver(bus: Bus, count: int, batch_sizes: Sequence[int]) -> dict[str, dict[str, int]]:
    result = {}
    for i, size in enumerate(batch_sizes):
        fresh = records(count, 356307042000000 + i * 10_000)
        batches = [fresh[j : j + size] for j in range(0, count, size)]
        written = await publish_rate(bus, batches)
        duplicate = await publish_rate(bus, batches)
        result[f"batch_{size}"] = {"written_per_s": round(written), "duplicates_per_s": round(duplicate)}
    return result


async def run(count: int, batch_sizes: Sequence[int], aof: bool) -> dict[str, object]:
    memory = MemoryBus(BusSettings(positions_maxlen=1_000_000))
    out: dict[str, object] = {"memory": await bench_driver(memory, count, batch_sizes)}
    await memory.close()
    with tempfile.TemporaryDirectory() as tmp:
        server = redis_server(Path(tmp), appendonly=aof).start()
        try:
            url = f"redis://127.0.0.1:{server.port}/0"
            bus = RedisBus(BusSettings(driver="redis", redis_url=url, positions_maxlen=1_000_000))
            await bus.connect()
            out["redis"] = await bench_driver(bus, count, batch_sizes)
            await bus.close()
        finally:
            server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000, help="records per driver and batch size")
    parser.add_argument("--batches", default="500,1000,2000", help="comma-separated batch sizes")
    parser.add_argument("--no-aof", action="store_true", help="run redis-server without the AOF")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as fleetgate does when installed)")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batches.split(",")]
    coro = run(args.records, batch_sizes, aof=not args.no_aof)
    if args.uvloop:
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    print(
        json.dumps(
            {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "records": args.records,
                "redis_aof": "always" if not args.no_aof else "off",
                "loop": "uvloop" if args.uvloop else "asyncio",
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
