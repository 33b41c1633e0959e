"""The embedded bus: bounded in-process streams with the same semantics as the Redis driver.

Used by ``fleetgate run`` (gateway and relay in one event loop), so nothing
here is shared between processes and nothing survives a restart: a record is
"durable" once it is in the deque. Each stream is a deque capped at its
configured length; entry ids are ``"<n>-0"`` with ``n`` increasing from 1 so
they read like Redis ids (compare them with :func:`entry_seq`, not as
strings). A batch is deduplicated and appended without any ``await``, which
is what makes ``publish`` atomic on one event loop.

Readers wait on a broadcast :class:`asyncio.Event` that is set and replaced on
every append, so any number of tails and group readers wake together without
a lock. A reader that falls further behind than the cap resumes at the oldest
retained entry, as a Redis reader would after ``MAXLEN`` trimming.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.bus.base import BusError
from gateway.records import IngestPosition, TrackedPosition
from gateway.settings import BusSettings

T = TypeVar("T")


def entry_id(seq: int) -> str:
    return f"{seq}-0"


def entry_seq(entry: str) -> int:
    """The sequence number of an entry id (``"12-0"`` or ``"12"``); ids sort by this, not as strings."""
    try:
        return int(entry.partition("-")[0])
    except ValueError:
        raise ValueError(f"not a stream entry id: {entry!r}") from None


@dataclass
class _Group:
    """One consumer group: everything up to ``delivered`` was handed out; ``pending`` maps seq -> consumer."""

    delivered: int
    pending: OrderedDict[int, str] = field(default_factory=OrderedDict)


class _Stream(Generic[T]):
    """A capped, append-only stream with broadcast wake-ups and consumer groups."""

    def __init__(self, maxlen: int) -> None:
        self.entries: deque[tuple[int, T]] = deque(maxlen=maxlen)
        self.last_seq = 0
        self.closed = False
        self._arrived = asyncio.Event()
        self._groups: dict[str, _Group] = {}

    def append(self, items: Sequence[T]) -> None:
        for item in items:
            self.last_seq += 1
            self.entries.append((self.last_seq, item))
        if items:
            self.wake()

    def wake(self) -> None:
        """Wake every reader waiting now; later waiters get the fresh event."""
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    def after(self, seq: int, count: int | None = None) -> list[tuple[int, T]]:
        """Entries with a sequence number above ``seq`` (at most ``count``), oldest first."""
        entries = self.entries
        if not entries or entries[-1][0] <= seq:
            return []
        # Sequence numbers are contiguous, so the start is an index; deque
        # indexing walks from the nearer end, and readers are usually near the tail.
        start = max(0, seq + 1 - entries[0][0])
        stop = len(entries) if count is None else min(len(entries), start + count)
        return [entries[i] for i in range(start, stop)]

    async def wait(self, timeout: float | None) -> bool:
        """Wait for the next append (or close); False on timeout."""
        arrived = self._arrived
        try:
            async with asyncio.timeout(timeout):
                await arrived.wait()
        except TimeoutError:
            return False
        return True

    async def read_group(self, group: str, consumer: str, count: int, block_ms: int) -> list[tuple[str, T]]:
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group(delivered=0)
        deadline = time.monotonic() + block_ms / 1000
        while not self.closed:
            batch = self.after(state.delivered, count)
            if batch:
                return self._deliver(state, consumer, batch)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.wait(remaining):
                return []
        raise BusError("bus closed")

    def _deliver(self, state: _Group, consumer: str, batch: list[tuple[int, T]]) -> list[tuple[str, T]]:
        state.delivered = batch[-1][0]
        pending = state.pending
        for seq, _ in batch:
            pending[seq] = consumer
        # Entries trimmed from the stream can never be processed: forget them
        # so a consumer that never acks cannot grow this beyond the stream's cap.
        oldest = self.entries[0][0]
        while pending and next(iter(pending)) < oldest:
            pending.popitem(last=False)
        return [(entry_id(seq), item) for seq, item in batch]

    def ack(self, group: str, entry_ids: Sequence[str]) -> None:
        state = self._groups.get(group)
        if state is not None:
            for entry in entry_ids:
                state.pending.pop(entry_seq(entry), None)

    def pending_count(self, group: str) -> int:
        state = self._groups.get(group)
        return 0 if state is None else len(state.pending)


class _DedupWindow:
    """Record ids seen in the last ``window_s`` seconds, at most ``max_ids`` of them (oldest evicted first).

    Insertion order is expiry order (one fixed window), so expired ids are
    always at the front and purging is amortised O(1). A duplicate does not
    extend its id's lifetime, matching ``SET NX EX`` on Redis.
    """

    def __init__(self, window_s: float, max_ids: int) -> None:
        self._window_s = window_s
        self._max_ids = max_ids
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def purge(self, now: float) -> None:
        expiry = self._expiry
        while expiry and next(iter(expiry.values())) <= now:
            expiry.popitem(last=False)

    def add(self, key: str, now: float) -> bool:
        """Remember ``key``; False if it was already seen (call :meth:`purge` first)."""
        expiry = self._expiry
        if key in expiry:
            return False
        expiry[key] = now + self._window_s
        if len(expiry) > self._max_ids:
            expiry.popitem(last=False)
        return True


class MemoryBus:
    """The in-process :class:`~gateway.bus.base.Bus` (see the module docstring)."""

    def __init__(self, settings: BusSettings) -> None:
        self._positions: _Stream[TrackedPosition] = _Stream(settings.positions_maxlen)
        self._ingest: _Stream[IngestPosition] = _Stream(settings.ingest_maxlen)
        self._dedup = _DedupWindow(settings.dedup_window_s, settings.memory_dedup_max)

    async def publish(self, records: Sequence[TrackedPosition]) -> list[bool]:
        # No await from here to the append: the batch is atomic on this loop.
        self._check_open()
        now = time.monotonic()
        self._dedup.purge(now)
        add = self._dedup.add
        flags = [add(record.id, now) for record in records]
        self._positions.append([record for record, fresh in zip(records, flags, strict=True) if fresh])
        return flags

    def tail(self, *, after: str = "$") -> AsyncIterator[tuple[str, TrackedPosition]]:
        # "$" is resolved now, not at the first iteration, so records published
        # between this call and the first ``anext`` are not missed.
        start = self._positions.last_seq if after == "$" else entry_seq(after)
        return self._tail(start)

    async def _tail(self, seq: int) -> AsyncIterator[tuple[str, TrackedPosition]]:
        stream = self._positions
        while not stream.closed:
            batch = stream.after(seq)
            if not batch:
                await stream.wait(None)
                continue
            for entry_seq_, record in batch:
                seq = entry_seq_
                yield entry_id(entry_seq_), record

    async def read_group(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, TrackedPosition]]:
        """See :meth:`Bus.read_group`; ``block_ms=0`` returns at once when nothing is new."""
        return await self._positions.read_group(group, consumer, count, block_ms)

    async def ack(self, group: str, entry_ids: Sequence[str]) -> None:
        self._positions.ack(group, entry_ids)

    async def publish_ingest(self, items: Sequence[IngestPosition]) -> None:
        self._check_open()
        self._ingest.append(items)

    async def read_ingest(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, IngestPosition]]:
        return await self._ingest.read_group(group, consumer, count, block_ms)

    async def ack_ingest(self, group: str, entry_ids: Sequence[str]) -> None:
        self._ingest.ack(group, entry_ids)

    async def length(self) -> int:
        return len(self._positions.entries)

    async def pending(self, group: str, *, stream: str = "positions") -> int:
        """Delivered and not yet acknowledged entries of ``group`` on ``positions`` or ``ingest``."""
        return (self._positions if stream == "positions" else self._ingest).pending_count(group)

    async def close(self) -> None:
        """End every tail; group reads and writes raise :class:`BusError` from now on."""
        for stream in (self._positions, self._ingest):
            stream.closed = True
            stream.wake()

    def _check_open(self) -> None:
        if self._positions.closed:
            raise BusError("bus closed")
