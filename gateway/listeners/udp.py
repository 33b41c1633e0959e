"""Teltonika over UDP: one AVL packet per datagram, ACKed to the sender once committed (docs/device-protocols.md 3).

Each datagram is decoded at once; the registry lookup and the commit run in
a task, bounded by ``udp_max_inflight``: past it, datagrams are dropped
unacknowledged (counted), and the devices resend them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from gateway import metrics
from gateway.bus.base import BusError
from gateway.ingest import Ingest
from gateway.settings import GatewaySettings
from trackcodecs import AvlPacket, CodecError, teltonika_udp

log = logging.getLogger(__name__)
PROTOCOL = "teltonika-udp"


class TeltonikaUdp(asyncio.DatagramProtocol):
    def __init__(self, settings: GatewaySettings, ingest: Ingest) -> None:
        self.settings = settings
        self.ingest = ingest
        self.transport: asyncio.DatagramTransport | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.accepting = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport: this is a DatagramProtocol

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.accepting:
            return  # stopping: no ACK, the device resends to the next gateway
        received_at, clock = datetime.now(UTC), time.perf_counter()
        try:
            event = teltonika_udp.decode_datagram(data, max_frame=self.settings.limits.max_frame)
        except CodecError as exc:
            metrics.DECODE_ERRORS.labels(protocol=PROTOCOL, reason=exc.reason).inc()
            return
        metrics.FRAMES.labels(protocol=PROTOCOL, type=event.__struct_config__.tag).inc()
        if not isinstance(event, AvlPacket) or event.imei is None:
            return
        if len(self.inflight) >= self.settings.limits.udp_max_inflight:
            metrics.CONNECTIONS_REJECTED.labels(protocol=PROTOCOL, reason="udp_inflight").inc()
            return
        task = asyncio.get_running_loop().create_task(self._commit(event, addr, received_at, clock))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _commit(self, packet: AvlPacket, addr: tuple[str, int], received_at: datetime, clock: float) -> None:
        assert packet.imei is not None
        try:
            device = await self.ingest.device_for(packet.imei, PROTOCOL)
            if device is None:
                return  # unknown device: no ACK, nothing published
            stored = await self.ingest.commit_event(device, PROTOCOL, packet, received_at)
        except BusError:
            return  # not durable: no ACK, the device resends
        except Exception:
            log.exception("unexpected error handling a UDP datagram")
            return
        if self.transport is not None:
            self.transport.sendto(teltonika_udp.ack_for(packet, accepted=stored), addr)
            metrics.ACK_LATENCY.labels(protocol=PROTOCOL).observe(time.perf_counter() - clock)

    async def drain(self, timeout: float) -> None:
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=timeout)


async def start_udp(settings: GatewaySettings, ingest: Ingest, host: str, port: int) -> TeltonikaUdp:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(lambda: TeltonikaUdp(settings, ingest), local_addr=(host, port))
    return protocol
