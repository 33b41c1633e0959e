"""Promise 8: 10,000 garbage TCP streams per protocol: nothing escapes, every connection is closed and counted,
connections, sessions and file descriptors return to where they were."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from pathlib import Path

import pytest
from gatewaykit import running_gateway

from gateway import metrics

STREAMS = 10_000
CONCURRENCY = 200


def closed_count(protocol: str) -> float:
    total = 0.0
    for family in metrics.CLOSED_CONNECTIONS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("protocol") == protocol:
                total += sample.value
    return total


async def one_stream(port: int, rng: random.Random, wait_for_close: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(rng.randbytes(rng.randint(1, 300)))
        if wait_for_close:  # let the server decide: a codec error, garbage limit or login timeout
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(3):
                    while await reader.read(4096):
                        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.mark.parametrize("protocol", ["gt06", "teltonika"])
async def test_garbage_streams(tmp_path: Path, protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    limits = {"login_timeout_s": 0.3, "max_connections_per_ip": 100_000, "max_frame": 256}
    async with running_gateway(tmp_path, limits=limits) as gw:
        port = gw.port(protocol)
        closed_before = closed_count(protocol)
        rng = random.Random(8)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def run(i: int) -> None:
            async with gate:
                await one_stream(port, random.Random(rng.random()), wait_for_close=i % 2 == 0)

        await asyncio.gather(*(run(i) for i in range(STREAMS)))
        async with asyncio.timeout(5):
            while gw.devices.connections or closed_count(protocol) - closed_before < STREAMS:
                await asyncio.sleep(0.05)
        assert closed_count(protocol) - closed_before == STREAMS
        assert gw.devices.limits.total == 0 and not gw.devices.limits.per_ip
        assert len(gw.devices.sessions) == 0
        assert await gw.bus.length() == 0
    await asyncio.sleep(0.1)
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, errors[:3]  # nothing unhandled, nothing logged as an internal error
