"""The gateway as one object: listeners, ingest, the ``ingest`` stream consumer, in one event loop.

``fleetgate run`` and ``fleetgate gateway`` build it from settings, a bus and
a state store; tests build it with port 0 listeners. :meth:`Gateway.stop`
is the SIGTERM path: stop accepting, let in-flight commits finish and be
ACKed, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket

from gateway.bus.base import Bus
from gateway.ingest import Ingest
from gateway.listeners.mqtt import MqttIngest
from gateway.listeners.tcp import DeviceServer, Gt06Connection, TeltonikaConnection, start_tcp
from gateway.listeners.udp import TeltonikaUdp, start_udp
from gateway.settings import GatewaySettings
from gateway.state.base import StateStore

log = logging.getLogger(__name__)


def tune_gc() -> None:
    """After start-up: keep the long-lived objects out of every collection and collect less often.

    Under load, full collections of everything built at start-up took up to 75 ms, stalling every ACK.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Gateway:
    def __init__(self, settings: GatewaySettings, bus: Bus, store: StateStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.ingest = Ingest(settings, bus, store)
        self.devices = DeviceServer(settings, self.ingest)
        self.servers: dict[str, asyncio.Server] = {}
        self.udp: TeltonikaUdp | None = None
        self.mqtt: MqttIngest | None = None
        self._consumer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings.listeners
        self.ingest.start()
        self.devices.start()
        if s.gt06:
            self.servers["gt06"] = await start_tcp(self.devices, s.host, s.gt06_port, Gt06Connection)
        if s.teltonika:
            self.servers["teltonika"] = await start_tcp(self.devices, s.host, s.teltonika_port, TeltonikaConnection)
        if s.teltonika_udp:
            self.udp = await start_udp(self.settings, self.ingest, s.host, s.teltonika_udp_port)
        # A stable consumer name: after a restart this gateway takes back what it had been given but not acked.
        consumer = f"gateway-{socket.gethostname()}"
        self._consumer = asyncio.create_task(self.ingest.consume_ingest("gateway", consumer), name="ingest-consumer")
        if self.settings.mqtt.enabled:
            mqtt = MqttIngest(self.settings.mqtt, self.ingest)
            await mqtt.start()
            self.mqtt = mqtt
        tune_gc()

    def port(self, name: str) -> int:
        """The bound port of a listener (``gt06``, ``teltonika``, ``teltonika-udp``), for port-0 setups."""
        if name == "teltonika-udp":
            assert self.udp is not None and self.udp.transport is not None
            return int(self.udp.transport.get_extra_info("sockname")[1])
        return int(self.servers[name].sockets[0].getsockname()[1])

    def health(self) -> dict[str, object]:
        return {
            "status": "ok",
            "listeners": sorted(self.servers) + (["teltonika-udp"] if self.udp else []),
            "connections": len(self.devices.connections),
            "sessions": len(self.devices.sessions),
            **({"mqtt": self.mqtt.health()} if self.mqtt is not None else {}),
        }

    async def stop(self, timeout: float = 8.0) -> None:
        """Stop accepting, finish in-flight frames (commit + ACK), close everything within ``timeout``."""
        for server in self.servers.values():
            server.close()
        if self.udp is not None:
            self.udp.accepting = False
        if self.mqtt is not None:
            await self.mqtt.stop(timeout / 2)
        await self.devices.stop(timeout / 2)
        if self.udp is not None:
            await self.udp.drain(timeout / 4)
            if self.udp.transport is not None:
                self.udp.transport.close()
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        await self.ingest.close()
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
