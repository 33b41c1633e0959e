"""The TCP listeners end to end over loopback: handshakes, ACK after commit, dedup, sessions, limits."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from conftest import FIXTURE_CASES
from gatewaykit import GT06_IMEI, IMEI, DeviceClient, HeldBus, device, records_on, running_gateway

from gateway import metrics
from gateway.bus.memory import MemoryBus
from gateway.records import fix_time_ms
from gateway.settings import BusSettings
from trackcodecs import gt06

IMEI_PACKET = struct.pack(">H", 15) + IMEI.encode()
# Teltonika wiki codec 8 example with 2 records (fixtures/teltonika/dev-tltcp-003)
AVL_2 = next(f.data for f in FIXTURE_CASES if f.id == "teltonika/dev-tltcp-003")
LOGIN = bytes.fromhex("78780d01012345678901234500018cdd0d0a")
LOCATION = bytes.fromhex("78781f120b081d112e10cf027ac7eb0c46584900148f01cc00287d001fb8000380810d0a")
ALARM = bytes.fromhex("787825160b0b0f0e241dcf027ac8870c4657e60014020901cc00287d001f726506040101003656a40d0a")
HEARTBEAT = bytes.fromhex("78780a134004040001000fdcee0d0a")


def metric(counter: object, **labels: str) -> float:
    return float(counter.labels(**labels)._value.get())  # type: ignore[attr-defined]


async def test_teltonika_handshake_ack_and_enrichment(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, devices=[device()]) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        await client.send(AVL_2)
        assert await client.recv(4) == b"\x00\x00\x00\x02"
        first, second = await records_on(gw.bus, 2)
        assert (first.asset_id, first.company_id, first.display_name) == ("truck-7", "acme", "Truck 7")
        assert first.imei == IMEI and first.source == "teltonika" and first.kind == "position"
        assert "no_fix" in first.flags and not first.valid  # 0 satellites: flagged, not dropped
        assert first.fix_time < second.fix_time
        await client.close()


async def test_teltonika_unknown_device_gets_00_and_is_closed(tmp_path: Path) -> None:
    before = metric(metrics.UNKNOWN_DEVICES, protocol="teltonika")
    async with running_gateway(tmp_path) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x00"
        assert await client.closed_within(2)
        assert await gw.bus.length() == 0
    assert metric(metrics.UNKNOWN_DEVICES, protocol="teltonika") == before + 1


async def test_unknown_device_registered_by_policy(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, registry={"unknown_devices": "register", "default_company": "new"}) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        await client.send(AVL_2)
        assert await client.recv(4) == b"\x00\x00\x00\x02"
        (record,) = await records_on(gw.bus, 1)
        assert (record.asset_id, record.company_id) == (IMEI, "new")
        assert await gw.store.get_device(IMEI) is not None
        await client.close()


async def test_gt06_login_location_alarm_heartbeat(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, devices=[device(GT06_IMEI, "van-1")]) as gw:
        client = await DeviceClient.connect(gw.port("gt06"))
        await client.send(LOGIN)
        assert await client.recv(10) == gt06.ack(0x01, 1)
        await client.send(LOCATION + HEARTBEAT + ALARM)
        assert await client.recv(10) == gt06.ack(0x13, 15)
        assert await client.recv(10) == gt06.ack(0x16, 0x36)
        location, alarm = await records_on(gw.bus, 2)
        assert location.kind == "position" and location.asset_id == "van-1" and location.valid
        assert alarm.kind == "alarm" and [e.name for e in alarm.events] == ["sos"]
        assert alarm.ignition is False
        await client.close()


async def test_gt06_unknown_device_gets_no_login_reply(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        client = await DeviceClient.connect(gw.port("gt06"))
        await client.send(LOGIN)
        assert await client.closed_within(2)
        assert client.reader.at_eof()
        await client.close()


async def test_gt06_data_before_login_closes(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, devices=[device(GT06_IMEI)]) as gw:
        client = await DeviceClient.connect(gw.port("gt06"))
        await client.send(LOCATION)
        assert await client.closed_within(2)
        assert await gw.bus.length() == 0


async def test_no_ack_before_the_bus_confirms(tmp_path: Path) -> None:
    """Promise 1: with the bus write held, not one ACK byte is written; released, the ACK follows."""
    bus = HeldBus(MemoryBus(BusSettings()))
    async with running_gateway(tmp_path, devices=[device()], bus=bus) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        bus.release.clear()
        await client.send(AVL_2)
        assert await client.nothing_within(0.5)
        assert bus.publishes == 1 and await gw.bus.length() == 0
        bus.release.set()
        assert await client.recv(4) == b"\x00\x00\x00\x02"
        await client.close()


async def test_bus_failure_means_no_ack_and_close(tmp_path: Path) -> None:
    bus = HeldBus(MemoryBus(BusSettings()))
    bus.fail = True
    async with running_gateway(tmp_path, devices=[device(), device(GT06_IMEI, "van-1")], bus=bus) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        await client.send(AVL_2)
        assert await client.closed_within(2)
        gt = await DeviceClient.connect(gw.port("gt06"))
        await gt.send(LOGIN)
        assert await gt.recv(10) == gt06.ack(0x01, 1)
        await gt.send(ALARM)
        assert await gt.closed_within(2)
        assert await gw.bus.length() == 0


async def test_each_fixture_replayed_three_times_gives_one_record(tmp_path: Path) -> None:
    """Promise 6 over TCP: every accepted AVL fixture, sent three times, lands once per record id."""
    avl = [
        f
        for f in FIXTURE_CASES
        if f.protocol == "teltonika" and f.expected["ok"] and f.crc_policy == "reject"
        and any(e["type"] == "position" for e in f.expected["events"]) and f.data[:2] == b"\0\0"
    ]  # fmt: skip
    assert len(avl) >= 8
    async with running_gateway(tmp_path, devices=[device()]) as gw:
        expected_ids: set[str] = set()
        for fixture in avl:
            for _ in range(3):
                client = await DeviceClient.connect(gw.port("teltonika"))
                await client.send(IMEI_PACKET)
                assert await client.recv(1) == b"\x01"
                await client.send(fixture.data)
                acks = bytes.fromhex(fixture.expected["reply_hex"])  # one 4-byte count per packet
                assert await client.recv(len(acks)) == acks
                await client.close()
        records = await records_on(gw.bus, await gw.bus.length())
        ids = [r.id for r in records]
        assert len(ids) == len(set(ids))
        for fixture in avl:
            expected_ids |= {
                f"{IMEI}:{_ms(e['fix_time'])}:position" for e in fixture.expected["events"] if e["type"] == "position"
            }
        assert set(ids) == expected_ids


def _ms(iso: str) -> int:
    from datetime import datetime

    return fix_time_ms(datetime.fromisoformat(iso.replace("Z", "+00:00")))


async def test_one_session_per_imei(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, devices=[device()]) as gw:
        first = await DeviceClient.connect(gw.port("teltonika"))
        await first.send(IMEI_PACKET)
        assert await first.recv(1) == b"\x01"
        second = await DeviceClient.connect(gw.port("teltonika"))
        await second.send(IMEI_PACKET)
        assert await second.recv(1) == b"\x01"
        assert await first.closed_within(2)
        await second.send(AVL_2)
        assert await second.recv(4) == b"\x00\x00\x00\x02"
        assert gw.devices.sessions.get(IMEI) is not None and len(gw.devices.sessions) == 1
        await second.close()


async def test_login_timeout(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, limits={"login_timeout_s": 0.3}) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        assert not await client.closed_within(0.1)
        assert await client.closed_within(2)


async def test_idle_timeout(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, devices=[device()], limits={"idle_timeout_s": 0.4}) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        for _ in range(3):  # activity keeps it open
            await asyncio.sleep(0.2)
            await client.send(b"\xff")
        assert not await client.closed_within(0.1)
        assert await client.closed_within(2)


async def test_declared_length_over_max_frame_closes_at_once(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, devices=[device()], limits={"max_frame": 1024}) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        await client.send(b"\0\0\0\0" + struct.pack(">I", 5000))
        assert await client.closed_within(1)
        gt = await DeviceClient.connect(gw.port("gt06"))
        await gt.send(b"\x79\x79\x10\x00")
        assert await gt.closed_within(1)


async def test_connection_limits_per_ip_and_total(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, limits={"max_connections_per_ip": 2}) as gw:
        clients = [await DeviceClient.connect(gw.port("teltonika")) for _ in range(3)]
        assert await clients[2].closed_within(1)
        assert not await clients[0].closed_within(0.2)
        await clients[0].close()
        await asyncio.sleep(0.1)
        again = await DeviceClient.connect(gw.port("gt06"))
        assert not await again.closed_within(0.2)
    async with running_gateway(tmp_path, limits={"max_connections": 1}) as gw:
        one = await DeviceClient.connect(gw.port("teltonika"))
        two = await DeviceClient.connect(gw.port("gt06"))
        assert await two.closed_within(1)
        assert not await one.closed_within(0.2)


async def test_acks_echo_only_what_was_stored_after_a_codec_error(tmp_path: Path) -> None:
    """A good packet followed by garbage: the good one is committed and ACKed, then the connection closes."""
    async with running_gateway(tmp_path, devices=[device()]) as gw:
        client = await DeviceClient.connect(gw.port("teltonika"))
        await client.send(IMEI_PACKET)
        assert await client.recv(1) == b"\x01"
        await client.send(AVL_2 + b"\x00\x00\xde\xad")
        assert await client.recv(4) == b"\x00\x00\x00\x02"
        assert await client.closed_within(2)
        assert await gw.bus.length() == 2


async def test_group_commit_batches_many_connections_into_one_write(tmp_path: Path) -> None:
    """While one bus write is in flight, every other connection's frame waits and goes out in the next write."""
    imeis = [f"35630704244{n:04d}" for n in range(10)]
    bus = HeldBus(MemoryBus(BusSettings()))
    async with running_gateway(tmp_path, devices=[device(i, f"t{i}") for i in imeis], bus=bus) as gw:
        clients = []
        for imei in imeis:
            client = await DeviceClient.connect(gw.port("teltonika"))
            await client.send(struct.pack(">H", 15) + imei.encode())
            assert await client.recv(1) == b"\x01"
            clients.append(client)
        bus.release.clear()
        await clients[0].send(AVL_2)
        while bus.publishes < 1:
            await asyncio.sleep(0.01)
        for client in clients[1:]:
            await client.send(AVL_2)
        await asyncio.sleep(0.3)  # the other nine frames queue behind the held write
        bus.release.set()
        for client in clients:
            assert await client.recv(4) == b"\x00\x00\x00\x02"
        assert bus.publishes == 2  # one write for the first frame, one for the nine others
        assert await gw.bus.length() == 20
        for client in clients:
            await client.close()
