"""RELIABILITY promises 2, 3 and 5 with real processes: a gateway on a private Redis (AOF, fsync always) and
20 simulated Teltonika devices that resend what was not ACKed, as real devices do."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from procs import GatewayProcess
from servers import Server, redis_server

from gateway.bus.redis import RedisBus
from gateway.records import fix_time_ms
from gateway.settings import BusSettings
from gateway.simulator import Simulation

RECORDS = 10_000
DEVICES = 20


@pytest.fixture
def redis_aof(tmp_path: Path) -> object:
    server = redis_server(tmp_path / "redis", appendonly=True).start()
    yield server
    server.kill()


def gateway_env(redis: Server) -> dict[str, str]:
    url = f"redis://127.0.0.1:{redis.port}/0"
    return {
        "FLEETGATE_BUS__DRIVER": "redis",
        "FLEETGATE_BUS__REDIS_URL": url,
        "FLEETGATE_STATE__DRIVER": "redis",
        "FLEETGATE_STATE__REDIS_URL": url,
        "FLEETGATE_REGISTRY__UNKNOWN_DEVICES": "register",
    }


def simulation(gw: GatewayProcess) -> Simulation:
    return Simulation(
        "teltonika", DEVICES, port=gw.ports["teltonika"], interval=0, total_records=RECORDS,
        records_per_packet=10, ack_timeout=2.0, reconnect_delay=0.1, deadline=90,
    )  # fmt: skip


async def until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def stream_keys(redis: Server) -> list[tuple[str, int]]:
    """(imei, fix ms) of every record in the positions stream, in stream order."""
    bus = RedisBus(BusSettings(driver="redis", redis_url=f"redis://127.0.0.1:{redis.port}/0"))
    try:
        total = await bus.length()
        keys = []
        async for _, record in bus.tail(after="0"):
            keys.append((record.imei, fix_time_ms(record.fix_time)))
            if len(keys) == total:
                break
        return keys
    finally:
        await bus.close()


def check_exactly_once(sim: Simulation, keys: list[tuple[str, int]]) -> None:
    assert sim.stats.records_acked == RECORDS
    assert len(keys) == len(set(keys)), "duplicates downstream"
    assert set(keys) == sim.acked_keys() == sim.sent_keys(), "lost or unexpected records"


@contextlib.asynccontextmanager
async def burst_one_third_acked(tmp_path: Path, redis: Server) -> AsyncIterator[tuple[GatewayProcess, Simulation, Any]]:
    """A gateway process and a running simulation, yielded once a third of the records are ACKed."""
    gw = await asyncio.to_thread(GatewayProcess(tmp_path, "gateway", **gateway_env(redis)).start)
    try:
        sim = simulation(gw)
        run = asyncio.create_task(sim.run())
        await until(lambda: sim.stats.records_acked >= RECORDS // 3, 30)
        yield gw, sim, run
    finally:
        gw.stop()


async def test_kill9_gateway_mid_burst(tmp_path: Path, redis_aof: Server) -> None:
    """Promise 2: kill -9 the gateway mid-burst, restart at once: 0 lost, 0 duplicates."""
    async with burst_one_third_acked(tmp_path, redis_aof) as (gw, sim, run):
        gw.signal(signal.SIGKILL)
        gw.wait(5)
        await asyncio.to_thread(gw.restart)
        await asyncio.wait_for(run, 90)
        assert sim.stats.records_resent > 0 or sim.stats.reconnects > 0
        check_exactly_once(sim, await stream_keys(redis_aof))


async def test_kill9_redis_mid_burst(tmp_path: Path, redis_aof: Server) -> None:
    """Promise 3: kill -9 redis-server (AOF on) mid-burst and restart it: no acknowledged record is lost."""
    async with burst_one_third_acked(tmp_path, redis_aof) as (_, sim, run):
        redis_aof.kill()
        acked_while_down = sim.stats.records_acked
        await asyncio.sleep(1.0)
        assert sim.stats.records_acked - acked_while_down <= DEVICES * 10  # at most the in-flight packets
        await asyncio.to_thread(redis_aof.start)
        await asyncio.wait_for(run, 90)
        check_exactly_once(sim, await stream_keys(redis_aof))


async def test_sigterm_mid_burst(tmp_path: Path, redis_aof: Server) -> None:
    """Promise 5: SIGTERM mid-burst: in-flight commits finish and are ACKed, exit within 10 s, nothing lost."""
    async with burst_one_third_acked(tmp_path, redis_aof) as (gw, sim, run):
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert await asyncio.to_thread(gw.wait, 10) == 0
        assert time.monotonic() - started < 10
        await asyncio.to_thread(gw.restart)
        await asyncio.wait_for(run, 90)
        check_exactly_once(sim, await stream_keys(redis_aof))
