"""The ingest service: what every listener (TCP, UDP, MQTT) and the ``ingest`` stream consumer call.

It owns the registry lookup with the unknown-device policy, the pipeline,
and the group committer. A listener calls :meth:`Ingest.device_for` on
login, then :meth:`Ingest.commit_event` for each decoded frame, and sends
the device its ACK only after that returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from gateway import metrics
from gateway.bus.base import Bus, BusError
from gateway.committer import GroupCommitter
from gateway.pipeline import AssetState, Pipeline
from gateway.records import Device, TrackedPosition
from gateway.settings import GatewaySettings
from gateway.state.base import StateStore
from trackcodecs import Event, Position

log = logging.getLogger(__name__)


class Ingest:
    def __init__(self, settings: GatewaySettings, bus: Bus, store: StateStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.pipeline = Pipeline(settings.pipeline)
        self.committer = GroupCommitter(bus, store, max_batch=settings.commit.max_batch)
        self._primed: set[str] = set()

    def start(self) -> None:
        self.committer.start()

    async def close(self) -> None:
        await self.committer.close()

    async def device_for(self, imei: str, protocol: str) -> Device | None:
        """The registered device for ``imei``; unknown ones are registered or refused by policy (and counted)."""
        try:
            device = await self.store.get_device(imei)
        except Exception as exc:  # the registry is unreachable: refuse for now, the device retries
            raise BusError(f"state store unavailable: {type(exc).__name__}") from exc
        if device is not None:
            return device
        metrics.UNKNOWN_DEVICES.labels(protocol=protocol).inc()
        if self.settings.registry.unknown_devices != "register":
            return None
        device = Device(imei=imei, asset_id=imei, company_id=self.settings.registry.default_company, protocol=protocol)
        await self.store.put_device(device)
        log.info("registered unknown device", extra={"protocol": protocol})
        return device

    async def commit_event(self, device: Device, source: str, event: Event, received_at: datetime) -> int:
        """Run ``event`` through the pipeline and commit its records; return how many it held.

        Raises :class:`BusError` when the records could not be made durable: the caller must not ACK.
        """
        await self._prime(device.asset_id)
        records = self.pipeline.records_for(device, source, event, received_at)
        await self.committer.commit(records)
        return len(records)

    async def commit_positions(
        self, device: Device, source: str, positions: Sequence[Position], received_at: datetime
    ) -> list[bool]:
        """Commit plain positions (MQTT JSON): pipeline, then the bus."""
        await self._prime(device.asset_id)
        records = [self.pipeline.enrich(device, source, p, received_at) for p in positions]
        return await self.committer.commit(records)

    async def _prime(self, asset_id: str) -> None:
        """Seed the pipeline's per-asset state from the last stored position, once per asset."""
        if asset_id in self._primed:
            return
        self._primed.add(asset_id)
        last = await self.store.last_position(asset_id)
        if last is not None and asset_id not in self.pipeline.assets:
            self.pipeline.assets[asset_id] = AssetState(
                moving=last.moving,
                last_fix=last.fix_time,
                last_lat=last.lat,
                last_lng=last.lng,
                odometer_m=float(last.odometer_m or 0),
            )

    async def consume_ingest(self, group: str = "gateway", consumer: str = "gateway-1") -> None:
        """Run driver positions from the ``ingest`` stream through the pipeline, ack after commit; forever."""
        while True:
            try:
                items = await self.bus.read_ingest(group, consumer, count=500, block_ms=1000)
            except BusError:
                await asyncio.sleep(1.0)
                continue
            if not items:
                continue
            records: list[TrackedPosition] = []
            for _, item in items:
                await self._prime(item.asset_id)
                records.append(self.pipeline.from_ingest(item))
            while True:  # delivered to this consumer: retry until durable, then ack
                try:
                    await self.committer.commit(records)
                    break
                except BusError:
                    await asyncio.sleep(1.0)
            try:
                await self.bus.ack_ingest(group, [entry_id for entry_id, _ in items])
            except BusError:
                log.warning("ingest ack failed; the items will be redelivered and dropped as duplicates")
