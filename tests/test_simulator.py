"""The device simulator: real protocol bytes, exact delivery through an in-process gateway, resends, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import struct
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gatewaykit import HeldBus, device, records_on, running_gateway

from fleetgate.cli import build_parser
from fleetgate.simulate import simulate
from gateway.bus.memory import MemoryBus
from gateway.records import TrackedPosition
from gateway.settings import BusSettings
from gateway.simulator import Simulation, imei_for
from trackcodecs import Alarm, AvlPacket, Location, gt06, teltonika, teltonika_udp
from trackcodecs.teltonika import luhn_ok

START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
PORT_NAMES = {"gt06": "gt06", "teltonika": "teltonika", "teltonika-udp": "teltonika-udp"}


def key(record: TrackedPosition) -> tuple[str, int]:
    return record.imei, int(record.id.split(":")[1])


async def bus_records(bus: Any) -> list[TrackedPosition]:
    return await records_on(bus, await bus.length())


# -- the devices' bytes, checked with our own decoders


def test_imeis_are_luhn_valid_and_follow_the_base() -> None:
    imeis = [imei_for("35000000000000", i) for i in range(200)]
    assert all(len(i) == 15 and luhn_ok(i) for i in imeis)
    assert imeis[0] == "350000000000006" and imeis[1][:14] == "35000000000001"
    assert imei_for("356307042441013", 0) == "356307042441013"  # a full IMEI as base: itself first
    with pytest.raises(ValueError):
        imei_for("123", 0)


def test_teltonika_packets_decode_with_io_and_increasing_times() -> None:
    sim = Simulation("teltonika", 2, records_per_packet=10, start_time=START, seed=3)
    decoder = teltonika.TeltonikaDecoder()
    for _ in range(5):
        decoder.receive_data(sim.devices[0].next_packet().data)  # type: ignore[attr-defined]
    positions = [p for event in decoder.events() if isinstance(event, AvlPacket) for p in event.positions]
    assert len(positions) == 50 and all(p.valid for p in positions)
    times = [p.fix_time for p in positions]
    assert times[0] == START and all(b > a for a, b in itertools.pairwise(times))
    assert all({239, 240, 66, 16, 21} <= set(p.io) for p in positions)
    assert all(0 <= p.speed_kmh <= 90 and 47 < p.lat < 56 and 5 < p.lng < 25 for p in positions)
    steps = [abs(b.lat - a.lat) + abs(b.lng - a.lng) for a, b in itertools.pairwise(positions)]
    assert max(steps) < 0.01  # 90 km/h for one second is 25 m, far below 0.01 degrees


def test_routes_are_deterministic_for_a_seed() -> None:
    def packets(seed: int) -> list[bytes]:
        sim = Simulation("teltonika", 3, start_time=START, seed=seed)
        return [d.next_packet().data for d in sim.devices for _ in range(3)]  # type: ignore[attr-defined]

    assert packets(7) == packets(7)
    assert packets(7) != packets(8)


def test_udp_datagrams_decode_with_their_ids() -> None:
    sim = Simulation("teltonika-udp", 1, records_per_packet=4, start_time=START)
    first, second = sim.devices[0].next_packet(), sim.devices[0].next_packet()  # type: ignore[attr-defined]
    a, b = teltonika_udp.decode_datagram(first.data), teltonika_udp.decode_datagram(second.data)
    assert isinstance(a, AvlPacket) and isinstance(b, AvlPacket)
    assert a.imei == sim.imeis[0] and len(a.positions) == 4
    assert a.packet_id == b.packet_id and b.avl_packet_id == (a.avl_packet_id or 0) + 1 & 0xFF
    assert first.expect == teltonika_udp.ack_for(a)[:6]


def test_gt06_frames_decode_as_utc_locations_and_alarms() -> None:
    sim = Simulation("gt06", 1, start_time=START, alarm_every=5)
    dev: Any = sim.devices[0]
    decoder = gt06.Gt06Decoder()
    for _ in range(60):
        msg_type, content = dev.next_record()
        decoder.receive_data(gt06.build_frame(msg_type, bytes(content), dev.next_serial()))
    events = decoder.events()
    assert {type(e) for e in events} == {Location, Alarm}
    positions = [e.position for e in events if isinstance(e, Location | Alarm) and e.position is not None]
    assert len(positions) == 60 and all(p.valid for p in positions)
    assert [p.fix_time for p in positions] == [START.replace(second=s) for s in range(60)]


# -- end to end through an in-process gateway


@pytest.mark.parametrize(
    ("protocol", "devices", "records"), [("gt06", 3, 150), ("teltonika", 4, 205), ("teltonika-udp", 3, 122)]
)
async def test_every_record_is_delivered_once(tmp_path: Path, protocol: str, devices: int, records: int) -> None:
    sim = Simulation(protocol, devices, interval=0, total_records=records, deadline=8, ack_timeout=2, alarm_every=20)
    registered = [device(imei, f"asset-{n}") for n, imei in enumerate(sim.imeis)]
    async with running_gateway(tmp_path, devices=registered) as gw:
        sim.port = gw.port(PORT_NAMES[protocol])
        stats = await sim.run()
        on_bus = await bus_records(gw.bus)
    assert stats.records_sent == stats.records_acked == records
    assert stats.records_resent == stats.reconnects == stats.rejected == 0
    keys = [key(r) for r in on_bus]
    assert len(keys) == len(set(keys)) == records
    assert set(keys) == sim.sent_keys() == sim.acked_keys()
    assert all(r.valid and not r.flags and r.source == protocol for r in on_bus)
    by_device: dict[str, list[datetime]] = defaultdict(list)
    for record in on_bus:
        by_device[record.imei].append(record.fix_time)
    assert len(by_device) == devices and all(times == sorted(set(times)) for times in by_device.values())
    if protocol == "gt06":
        assert {r.kind for r in on_bus} == {"position", "alarm"}


@pytest.mark.parametrize("protocol", ["gt06", "teltonika", "teltonika-udp"])
async def test_bus_outage_means_resends_and_still_exactly_once(tmp_path: Path, protocol: str) -> None:
    """The bus fails for 0.5 s: no ACKs, connections closed; devices resend and each record lands once."""
    bus = HeldBus(MemoryBus(BusSettings()))
    interval = 0.01 if protocol == "gt06" else 0.02  # GT06 sends one record per frame
    sim = Simulation(
        protocol, 4, interval=interval, total_records=400, records_per_packet=5, deadline=10, ack_timeout=0.5,
        reconnect_delay=0.05, heartbeat_every=4,
    )  # fmt: skip
    async with running_gateway(tmp_path, devices=[device(i) for i in sim.imeis], bus=bus) as gw:
        sim.port = gw.port(PORT_NAMES[protocol])
        run = asyncio.create_task(sim.run())
        await asyncio.sleep(0.3)
        bus.fail = True
        await asyncio.sleep(0.5)
        bus.fail = False
        stats = await run
        on_bus = await bus_records(gw.bus)
    assert stats.records_acked == 400 and stats.records_resent > 0
    if protocol != "teltonika-udp":
        assert stats.reconnects > 0
    keys = [key(r) for r in on_bus]
    assert len(keys) == len(set(keys)) == 400
    assert set(keys) == sim.sent_keys() == sim.acked_keys()
    if protocol == "gt06":  # what the closed connection had not confirmed came back as re-uploads
        assert any("historical" in r.flags for r in on_bus)


async def test_teltonika_resends_the_same_bytes_after_a_lost_ack() -> None:
    """A server that drops the first connection at the first packet gets byte-identical packets twice."""
    packets: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = struct.unpack(">H", await reader.readexactly(2))[0]
        await reader.readexactly(size)
        writer.write(b"\x01")
        while True:
            head = await reader.readexactly(8)
            packet = head + await reader.readexactly(struct.unpack(">I", head[4:])[0] + 4)
            packets.append(packet)
            if len(packets) == 1:
                writer.close()  # no ACK: the device must reconnect and resend
                return
            writer.write(struct.pack(">I", packet[9]))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sim = Simulation("teltonika", 1, port=port, interval=0, total_records=20, reconnect_delay=0.05, deadline=5)
    stats = await sim.run()
    server.close()
    assert stats.records_acked == 20 and stats.records_resent == 10 and stats.reconnects == 1
    assert packets[0] == packets[1] and packets[2] != packets[1] and len(packets) == 3


@pytest.mark.parametrize("protocol", ["gt06", "teltonika"])
async def test_unknown_devices_are_counted_rejected(tmp_path: Path, protocol: str) -> None:
    async with running_gateway(tmp_path) as gw:
        sim = Simulation(protocol, 3, port=gw.port(protocol), interval=0, total_records=30, deadline=3)
        stats = await sim.run()
        assert await gw.bus.length() == 0
    assert stats.rejected == 3 and stats.records_acked == 0 and stats.reconnects == 0


async def test_duration_stops_a_paced_run(tmp_path: Path) -> None:
    sim = Simulation("teltonika", 5, interval=0.1, duration=0.6, ramp_s=0.05, records_per_packet=2)
    async with running_gateway(tmp_path, registry={"unknown_devices": "register"}) as gw:
        sim.port = gw.port("teltonika")
        stats = await asyncio.wait_for(sim.run(), 5)
        assert await gw.bus.length() == stats.records_acked
    assert 5 * 2 * 4 <= stats.records_acked <= 5 * 2 * 8  # about 6 sends each in 0.6 s
    assert stats.records_sent == stats.records_acked and stats.connected == 0


# -- the command


def cli_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", *argv])


async def test_cli_summary_and_hint_for_refused_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_gateway(tmp_path) as gw:
        args = cli_args("--devices", "2", "--records", "10", "--port", str(gw.port("teltonika")))
        sim = Simulation("teltonika", 2, port=args.port, total_records=10, deadline=3)
        err = io.StringIO()
        assert await simulate(sim, args, err=err) == 1
    assert "2 rejected" in capsys.readouterr().out
    assert "FLEETGATE_REGISTRY__UNKNOWN_DEVICES=register" in err.getvalue()
    assert "fleetgate devices add" in err.getvalue()


async def test_cli_register_then_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleetgate.config import load_config

    config = load_config(None, {"FLEETGATE_STATE__SQLITE_PATH": str(tmp_path / "state.sqlite")})
    args = cli_args("--protocol", "gt06", "--devices", "3", "--records", "30", "--interval", "0", "--register")
    async with running_gateway(tmp_path) as gw:  # the same SQLite file as the registry --register writes
        sim = Simulation("gt06", 3, port=gw.port("gt06"), interval=0, total_records=30, deadline=5)
        assert await simulate(sim, args, config, err=io.StringIO()) == 0
        assert await gw.bus.length() == 30
        assert (await gw.store.get_device(sim.imeis[2])) is not None
    assert "30 ACKed" in capsys.readouterr().out


def test_cli_arguments() -> None:
    args = cli_args("--protocol", "teltonika-udp", "--devices", "1000", "--interval", "0.5", "--duration", "30")
    assert (args.protocol, args.devices, args.interval, args.duration) == ("teltonika-udp", 1000, 0.5, 30.0)
    assert (args.host, args.port, args.records_per_packet, args.seed) == ("127.0.0.1", None, 10, 0)
    with pytest.raises(SystemExit):
        cli_args("--devices", "0")
