"""Teltonika over UDP: ACK after commit echoing the ids, unknown devices unanswered, duplicates dropped."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import FIXTURE_CASES
from gatewaykit import HeldBus, device, records_on, running_gateway

from gateway.bus.memory import MemoryBus
from gateway.settings import BusSettings

DATAGRAM = next(f.data for f in FIXTURE_CASES if f.id == "teltonika-udp/dev-tludp-001")
UDP_IMEI = "352093086403655"


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


async def udp_client(port: int) -> tuple[asyncio.DatagramTransport, UdpClient]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpClient, remote_addr=("127.0.0.1", port))
    return transport, protocol


async def test_udp_ack_after_commit_and_dedup(tmp_path: Path) -> None:
    bus = HeldBus(MemoryBus(BusSettings()))
    async with running_gateway(tmp_path, devices=[device(UDP_IMEI)], bus=bus) as gw:
        transport, client = await udp_client(gw.port("teltonika-udp"))
        bus.release.clear()
        transport.sendto(DATAGRAM)
        await asyncio.sleep(0.3)
        assert client.replies.empty()  # held commit: no ACK yet
        bus.release.set()
        assert await asyncio.wait_for(client.replies.get(), 2) == bytes.fromhex("0005cafe010501")
        for _ in range(2):  # the device resends: ACKed again, stored once
            transport.sendto(DATAGRAM)
            assert await asyncio.wait_for(client.replies.get(), 2) == bytes.fromhex("0005cafe010501")
        (record,) = await records_on(gw.bus, 1)
        assert record.source == "teltonika-udp" and record.imei == UDP_IMEI
        assert await gw.bus.length() == 1
        transport.close()


async def test_udp_unknown_device_and_garbage_get_no_answer(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        transport, client = await udp_client(gw.port("teltonika-udp"))
        transport.sendto(DATAGRAM)
        transport.sendto(b"\x00\x01garbage")
        await asyncio.sleep(0.4)
        assert client.replies.empty()
        assert await gw.bus.length() == 0
        transport.close()
