"""Group commit: many connections' records, one bus write.

Each session awaits :meth:`GroupCommitter.commit` for the records of one
frame. While a bus write is in flight, new requests queue up; when it
returns, everything queued (up to ``max_batch`` records) goes out in the
next single write. Under load, batches grow by themselves and Redis round
trips stop capping throughput; when idle, a lone frame is written at once.

A request's future resolves only after the bus confirmed the write (that is
when the device may be ACKed), or fails with the bus error (no ACK).
Last known positions are saved to the state store after the bus write; a
failure there is logged and does not fail the commit (they are derived).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence

from gateway import metrics
from gateway.bus.base import Bus, BusError
from gateway.records import TrackedPosition
from gateway.state.base import StateStore

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, bus: Bus, store: StateStore, *, max_batch: int = 2000) -> None:
        self.bus = bus
        self.store = store
        self.max_batch = max_batch
        self._queue: deque[tuple[Sequence[TrackedPosition], asyncio.Future[list[bool]]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._to_save: dict[str, TrackedPosition] = {}  # asset id -> newest record not yet saved
        self._save_wake = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")
        self._saver = asyncio.create_task(self._save_loop(), name="save-last-positions")

    async def commit(self, records: Sequence[TrackedPosition]) -> list[bool]:
        """Wait until ``records`` are durable on the bus; one flag each (False: a duplicate, already stored)."""
        if not records:
            return []
        if self._closing:
            raise BusError("gateway is stopping")
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._queue.append((records, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._save_wake.set()
        if self._saver is not None:
            await self._saver

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._write_batch()
            if self._closing:
                return

    async def _write_batch(self) -> None:
        batch: list[tuple[Sequence[TrackedPosition], asyncio.Future[list[bool]]]] = []
        records: list[TrackedPosition] = []
        while self._queue and (not records or len(records) + len(self._queue[0][0]) <= self.max_batch):
            item = self._queue.popleft()
            batch.append(item)
            records.extend(item[0])
        started = time.perf_counter()
        try:
            flags = await self.bus.publish(records)
        except Exception as exc:  # a bus failure fails this batch's requests: no ACK for them
            error = exc if isinstance(exc, BusError) else BusError(f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, BusError):
                log.exception("bus publish failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        metrics.COMMIT_LATENCY.observe(time.perf_counter() - started)
        metrics.COMMIT_BATCH_SIZE.observe(len(records))
        offset = 0
        for item_records, future in batch:
            if not future.done():
                future.set_result(flags[offset : offset + len(item_records)])
            offset += len(item_records)
        self._after_commit(records, flags)

    def _after_commit(self, records: list[TrackedPosition], flags: list[bool]) -> None:
        counts = Counter((record.source, new) for record, new in zip(records, flags, strict=True))
        for (source, new), n in counts.items():  # one metric update per kind, not per record
            (metrics.RECORDS_COMMITTED if new else metrics.DUPLICATES_DROPPED).labels(source=source).inc(n)
        newest = max(r.received_at for r in records)
        metrics.BUS_LAG.set(max(0.0, time.time() - newest.timestamp()))
        # Duplicates too: a resend after a lost publish reply comes back flagged as a duplicate, and its
        # last position may not have been saved yet. Only the newest record per asset is kept for saving.
        pending = self._to_save
        for record in records:
            held = pending.get(record.asset_id)
            if held is None or record.fix_time >= held.fix_time:
                pending[record.asset_id] = record
        self._save_wake.set()

    async def _save_loop(self) -> None:
        """Save last positions off the commit path, coalescing whatever accumulated meanwhile."""
        while True:
            await self._save_wake.wait()
            self._save_wake.clear()
            batch, self._to_save = self._to_save, {}
            if batch:
                try:
                    await self.store.save_last_positions(list(batch.values()))
                except Exception:
                    log.exception("saving last positions failed (records are on the bus)")
            if self._closing and not self._to_save and (self._task is None or self._task.done()):
                return
