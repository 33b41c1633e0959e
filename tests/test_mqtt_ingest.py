"""MQTT ingest against a private mosquitto: commit then PUBACK, redelivery of what was not acked, shared topics.

Every test uses its own client ids and topic prefix, because the broker (one per session) keeps
persistent sessions. "Not acknowledged" is observed the only way the broker shows it: a new
connection on the same session gets the message again (DUP set); an acknowledged one never comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import FIXTURE_CASES
from gatewaykit import IMEI, HeldBus, device, records_on, settings
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from servers import Server

from gateway import metrics
from gateway.bus.memory import MemoryBus
from gateway.ingest import Ingest
from gateway.listeners.mqtt import MqttIngest, TopicTemplate, parse_json, parse_teltonika
from gateway.settings import BusSettings, MqttSettings, StateSettings
from gateway.state.sqlite import SqliteStateStore
from trackcodecs import AvlPacket

UNKNOWN_IMEI = "490154203237518"
FULL_PACKET = next(f.data for f in FIXTURE_CASES if f.id == "teltonika/codec8-4-records")  # 4 records
DATA_FIELD = next(f.data for f in FIXTURE_CASES if f.id == "teltonika/codec8e-nx-two-records")[8:-4]  # 2 records


def fix(ts_ms: int, **fields: Any) -> dict[str, Any]:
    return {"ts": ts_ms, "lat": 54.6872, "lng": 25.2797, "speed": 42.5, "course": 90, "sats": 9, **fields}


def mqtt_settings(port: int, **overrides: Any) -> MqttSettings:
    tag = uuid.uuid4().hex[:8]
    base = MqttSettings(
        enabled=True,
        port=port,
        client_id=f"gw-{tag}",
        json_topic=f"t-{tag}/{{imei}}/position",
        teltonika_topic=f"t-{tag}/{{imei}}/teltonika",
        session_expiry_s=60,
    )
    return msgspec.structs.replace(base, **overrides)


def gateway_for(config: MqttSettings, ingest: Ingest) -> MqttIngest:
    return MqttIngest(config, ingest, retry_min_s=0.1, retry_max_s=0.5, ready_timeout_s=3.0)


@contextlib.asynccontextmanager
async def running(config: MqttSettings, ingest: Ingest) -> AsyncIterator[MqttIngest]:
    mqtt = gateway_for(config, ingest)
    await mqtt.start()
    assert mqtt.connected
    try:
        yield mqtt
    finally:
        await mqtt.stop(2.0)


class Publisher:
    """A device side: a plain paho client publishing QoS 1 and waiting for the broker's PUBACK."""

    def __init__(self, port: int) -> None:
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"dev-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    async def publish(self, topic: str, payload: bytes | str) -> None:
        info = self.client.publish(topic, payload, qos=1)
        await asyncio.to_thread(info.wait_for_publish, 3.0)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto_srv: Server) -> Any:
    pub = Publisher(mosquitto_srv.port)
    yield pub
    pub.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Ingest, HeldBus]]:
    """A real ingest service: SQLite registry with one device, a memory bus whose writes the test can hold or fail."""
    store = SqliteStateStore(StateSettings(sqlite_path=str(tmp_path / "state.sqlite")))
    await store.put_device(device(IMEI))
    bus = HeldBus(MemoryBus(BusSettings()))
    ingest = Ingest(settings(), bus, store)  # type: ignore[arg-type]  # HeldBus delegates the rest of Bus
    ingest.start()
    yield ingest, bus
    bus.release.set()
    bus.fail = False
    await ingest.close()
    await store.close()


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def topic(config: MqttSettings, kind: str = "json", imei: str = IMEI) -> str:
    template = config.json_topic if kind == "json" else config.teltonika_topic
    return template.replace("{imei}", imei)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# --- pure parts -------------------------------------------------------------------------------


def test_topic_template_subscription_and_imei() -> None:
    t = TopicTemplate("json", "fleet/{imei}/pos", "gws")
    assert t.filter == "fleet/+/pos" and t.subscription == "$share/gws/fleet/+/pos"
    assert t.imei_of("fleet/356307042441013/pos") == "356307042441013"
    assert t.imei_of("fleet/356307042441013/other") is None
    for bad in ("fleet/pos", "fleet/x{imei}/pos", "fleet/{imei}/{imei}", "#/{imei}"):
        with pytest.raises(ValueError):
            TopicTemplate("json", bad, None)


def test_json_schema() -> None:
    parsed = parse_json(b'{"ts": "2026-03-01T10:00:00+02:00", "lat": 1.5, "lng": 2.5, "ignition": true}')
    (p,) = parsed.positions
    assert p.fix_time is not None and p.fix_time.isoformat() == "2026-03-01T08:00:00+00:00"
    assert (p.lat, p.lng, p.ignition, p.speed_kmh, p.valid) == (1.5, 2.5, True, 0.0, True)
    assert len(parse_json(json.dumps([fix(1), fix(2)]).encode()).positions) == 2
    for bad in (b'{"ts": "2026-03-01T10:00:00", "lat": 1, "lng": 2}', b'{"ts": 1, "lat": "1", "lng": 2}', b"[]"):
        with pytest.raises(msgspec.ValidationError):
            parse_json(bad)


def test_teltonika_payload_forms() -> None:
    full, _ = parse_teltonika(FULL_PACKET, max_frame=32 * 1024)
    bare, _ = parse_teltonika(DATA_FIELD, max_frame=32 * 1024)
    assert [len(e.positions) for e in full.events if isinstance(e, AvlPacket)] == [4]
    assert [len(e.positions) for e in bare.events if isinstance(e, AvlPacket)] == [2]


# --- against the broker -----------------------------------------------------------------------


async def test_json_message_reaches_the_bus(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port)
    async with running(config, ingest) as mqtt:
        await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000, odometer=1200, ext_voltage=12.6)))
        await publisher.publish(topic(config), json.dumps([fix(1_767_225_660_000), fix(1_767_225_720_000)]))
        records = await records_on(bus, 3)
        await until(lambda: mqtt.health()["unacked"] == 0)
    first = records[0]
    assert (first.imei, first.asset_id, first.source) == (IMEI, "truck-7", "mqtt")
    assert (first.lat, first.speed_kmh, first.course, first.satellites) == (54.6872, 42.5, 90, 9)
    assert (first.odometer_m, first.external_voltage) == (1200, 12.6)
    assert first.fix_time.isoformat() == "2026-01-01T00:00:00+00:00"
    assert [r.fix_time.minute for r in records] == [0, 1, 2]


async def test_teltonika_payloads_reach_the_bus(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port)
    before = sample("fleetgate_frames_total", protocol="mqtt", type="avl")
    async with running(config, ingest):
        await publisher.publish(topic(config, "teltonika"), FULL_PACKET)
        await publisher.publish(topic(config, "teltonika"), DATA_FIELD)
        records = await records_on(bus, 6)
    assert all(r.source == "mqtt" and r.imei == IMEI for r in records)
    assert len({r.id for r in records}) == 6
    assert sample("fleetgate_frames_total", protocol="mqtt", type="avl") - before == 2


async def test_no_puback_before_commit_so_the_broker_redelivers(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port)
    bus.release.clear()  # every bus write waits: the commit cannot return
    first = gateway_for(config, ingest)
    await first.start()
    await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000)))
    await until(lambda: bus.publishes == 1)
    assert first.health()["unacked"] == 1
    await first.abort()  # the gateway dies with the commit in flight: no PUBACK was ever written

    async with running(config, ingest) as second:  # same client id: the session resumes
        await until(lambda: second.redelivered == 1)  # the broker resends it, DUP set
        assert await bus.length() == 0
        bus.release.set()  # both writes go through; the bus keeps one record (same record id)
        await until(lambda: second.health()["unacked"] == 0)
    assert await bus.length() == 1
    (record,) = await records_on(bus, 1)
    assert record.source == "mqtt"

    publishes = bus.publishes
    async with running(config, ingest) as third:  # committed and acked: nothing comes back
        await asyncio.sleep(0.5)
        assert third.received == 0
    assert bus.publishes == publishes and await bus.length() == 1


async def test_stop_finishes_the_commit_in_flight_then_acks(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port)
    bus.release.clear()
    mqtt = gateway_for(config, ingest)
    await mqtt.start()
    await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000)))
    await until(lambda: bus.publishes == 1)
    stopping = asyncio.create_task(mqtt.stop(3.0))  # SIGTERM with a commit in flight
    await asyncio.sleep(0.2)
    assert not stopping.done()
    bus.release.set()
    await asyncio.wait_for(stopping, 3.0)
    assert await bus.length() == 1 and not mqtt.connected

    async with running(config, ingest) as again:  # it was PUBACKed before the DISCONNECT
        await asyncio.sleep(0.5)
        assert again.received == 0


async def test_bus_failure_means_no_puback_and_a_redelivery(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port)
    bus.fail = True
    async with running(config, ingest) as mqtt:
        await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000)))
        await until(lambda: bus.publishes >= 1)
        bus.fail = False  # the reconnect after the failure gets the message again
        await until(lambda: mqtt.redelivered >= 1)
        await records_on(bus, 1)
        await until(lambda: mqtt.connected and mqtt.health()["unacked"] == 0)
    assert await bus.length() == 1


async def test_shared_subscription_splits_the_messages(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port, shared_group=f"g-{uuid.uuid4().hex[:8]}")
    other = msgspec.structs.replace(config, client_id=config.client_id + "-b")
    async with running(config, ingest) as a, running(other, ingest) as b:
        for i in range(20):
            await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000 + i * 1000)))
        records = await records_on(bus, 20)
        await until(lambda: a.received + b.received == 20)
        await asyncio.sleep(0.1)
        assert a.received > 0 and b.received > 0 and a.received + b.received == 20
    assert len({r.id for r in records}) == 20 and await bus.length() == 20


async def test_unknown_device_and_malformed_payloads_are_acked_and_counted(
    mosquitto_srv: Server, env: tuple[Ingest, HeldBus], publisher: Publisher
) -> None:
    ingest, bus = env
    config = mqtt_settings(mosquitto_srv.port)
    reasons = ("bad_json", "bad_schema", "bad_imei", "count_mismatch")
    errors_before = {r: sample("fleetgate_decode_errors_total", protocol="mqtt", reason=r) for r in reasons}
    unknown_before = sample("fleetgate_unknown_devices_total", protocol="mqtt")
    async with running(config, ingest) as mqtt:
        await publisher.publish(topic(config, imei=UNKNOWN_IMEI), json.dumps(fix(1_767_225_600_000)))
        await publisher.publish(topic(config), b"{not json")
        await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000, speed="fast")))
        await publisher.publish(topic(config, imei="not-an-imei"), json.dumps(fix(1_767_225_600_000)))
        await publisher.publish(topic(config, "teltonika"), bytes.fromhex("08010002"))  # N1 = 1, N2 = 2
        await publisher.publish(topic(config), json.dumps(fix(1_767_225_600_000)))  # a good one after them
        await records_on(bus, 1)
        await until(lambda: mqtt.received == 6 and mqtt.health()["unacked"] == 0)
    for reason in reasons:
        assert sample("fleetgate_decode_errors_total", protocol="mqtt", reason=reason) - errors_before[reason] == 1
    assert sample("fleetgate_unknown_devices_total", protocol="mqtt") - unknown_before == 1
    assert await bus.length() == 1

    async with running(config, ingest) as again:  # all six were PUBACKed: none comes back
        await asyncio.sleep(0.5)
        assert again.received == 0
