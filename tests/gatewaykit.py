"""Building blocks for gateway tests: an in-process gateway on port 0, device clients, a bus with held replies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from gateway.bus.base import Bus, BusError
from gateway.bus.memory import MemoryBus
from gateway.records import Device, TrackedPosition
from gateway.service import Gateway
from gateway.settings import BusSettings, GatewaySettings, StateSettings
from gateway.state.sqlite import SqliteStateStore

IMEI = "356307042441013"
GT06_IMEI = "123456789012345"


def settings(**sections: dict[str, Any]) -> GatewaySettings:
    """Loopback, port 0, short timeouts; ``sections`` override keys per section."""
    base: dict[str, dict[str, Any]] = {
        "listeners": {"host": "127.0.0.1", "gt06_port": 0, "teltonika_port": 0, "teltonika_udp_port": 0},
        "limits": {"login_timeout_s": 5.0, "idle_timeout_s": 30.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return msgspec.convert(base, GatewaySettings)


class HeldBus:
    """A real bus whose publish waits until released (or fails on demand): to watch what happens before a commit."""

    def __init__(self, inner: Bus) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False
        self.publishes = 0

    async def publish(self, records: Sequence[TrackedPosition]) -> list[bool]:
        self.publishes += 1
        await self.release.wait()
        if self.fail:
            raise BusError("bus unavailable (test)")
        return await self.inner.publish(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.asynccontextmanager
async def running_gateway(
    tmp_path: Any, *, devices: Sequence[Device] = (), bus: Any = None, **sections: dict[str, Any]
) -> AsyncIterator[Gateway]:
    config = settings(**sections)
    store = SqliteStateStore(StateSettings(sqlite_path=str(tmp_path / "state.sqlite")))
    for device in devices:
        await store.put_device(device)
    gateway = Gateway(config, bus if bus is not None else MemoryBus(BusSettings()), store)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(2.0)
        await store.close()


def device(imei: str = IMEI, asset: str = "truck-7", company: str = "acme", name: str = "Truck 7") -> Device:
    return Device(imei=imei, asset_id=asset, company_id=company, display_name=name)


async def records_on(bus: Any, n: int, timeout: float = 3.0) -> list[TrackedPosition]:
    """The first ``n`` records on the bus (waits for them)."""
    out: list[TrackedPosition] = []

    async def collect() -> None:
        async for _, record in bus.tail(after="0"):
            out.append(record)
            if len(out) >= n:
                return

    await asyncio.wait_for(collect(), timeout)
    return out


async def bus_count(bus: Any) -> int:
    return int(await bus.length())


class DeviceClient:
    """A raw TCP client speaking whatever bytes the test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> DeviceClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, n: int, timeout: float = 3.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def nothing_within(self, seconds: float) -> bool:
        """True when no byte arrives (and the connection stays open) for ``seconds``."""
        try:
            await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return True
        return False  # a byte arrived, or the connection closed

    async def closed_within(self, seconds: float) -> bool:
        """True when the server closes the connection within ``seconds`` (whatever bytes came before)."""
        try:
            async with asyncio.timeout(seconds):
                while await self.reader.read(4096):
                    pass
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
