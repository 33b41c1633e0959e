"""MQTT wired into the gateway: with ``[mqtt] enabled``, a device's JSON position reaches the bus enriched."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import paho.mqtt.publish as publish
from gatewaykit import IMEI, device, records_on, running_gateway
from servers import Server


async def test_gateway_with_mqtt_enabled(tmp_path: Path, mosquitto_srv: Server) -> None:
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": mosquitto_srv.port, "client_id": f"gw-{tmp_path.name}"}
    async with running_gateway(tmp_path, devices=[device()], mqtt=mqtt) as gw:
        assert gw.mqtt is not None
        async with asyncio.timeout(5):
            while not gw.health()["mqtt"]["connected"]:  # type: ignore[index]
                await asyncio.sleep(0.05)
        payload = json.dumps({"ts": "2026-05-01T08:00:00Z", "lat": 54.687, "lng": 25.279, "speed": 42, "sats": 9})
        await asyncio.to_thread(
            publish.single, f"fleetgate/devices/{IMEI}/position", payload, qos=1, port=mosquitto_srv.port
        )
        (record,) = await records_on(gw.bus, 1)
        assert (record.asset_id, record.source, record.speed_kmh, record.moving) == ("truck-7", "mqtt", 42.0, True)
