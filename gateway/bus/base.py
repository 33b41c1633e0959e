"""The bus contract: where committed records become durable and visible to every relay.

Two drivers implement it: :mod:`gateway.bus.memory` (embedded mode) and
:mod:`gateway.bus.redis` (distributed mode, Redis Streams). One conformance
suite (``tests/test_bus_conformance.py``) runs against both.

Streams:

* ``positions``: committed ``TrackedPosition`` records. ``publish`` writes
  a batch atomically with dedup (key = record id = IMEI + fix time + kind,
  bounded window); it returns only once the write is durable, and only then
  may the device be acknowledged. Every relay reads every record with
  ``tail``; a downstream consumer may use a consumer group with
  ``read_group`` / ``ack``.
* ``ingest``: ``IngestPosition`` items from other sources (drivers' phones,
  through the relay), consumed by the gateway pipeline with a consumer group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from gateway.records import IngestPosition, TrackedPosition


class BusError(Exception):
    """The bus could not confirm a write (unreachable, timed out): nothing may be acknowledged."""

    reason = "bus_unavailable"


class Bus(Protocol):
    """See the module docstring. Stream entry ids are strings, ordered within a stream."""

    async def publish(self, records: Sequence[TrackedPosition]) -> list[bool]:
        """Write ``records`` durably, dropping duplicates; one flag per record: True written, False duplicate.

        Raises :class:`BusError` when the write cannot be confirmed.
        """
        ...

    def tail(self, *, after: str = "$") -> AsyncIterator[tuple[str, TrackedPosition]]:
        """Every record after entry id ``after`` (``"$"``: only new ones; ``"0"``: all retained), forever."""
        ...

    async def read_group(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, TrackedPosition]]:
        """Records not yet delivered to ``group`` (created at the stream's start when missing).

        Waits up to ``block_ms`` for new ones; ``block_ms=0`` means do not wait (unlike Redis's BLOCK 0).
        The first call under a consumer name also returns that consumer's delivered-but-unacked entries.
        """
        ...

    async def ack(self, group: str, entry_ids: Sequence[str]) -> None:
        """Mark records of ``group`` as processed."""
        ...

    async def publish_ingest(self, items: Sequence[IngestPosition]) -> None:
        """Append positions from other sources to the ``ingest`` stream."""
        ...

    async def read_ingest(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, IngestPosition]]:
        """``ingest`` items not yet delivered to ``group``."""
        ...

    async def ack_ingest(self, group: str, entry_ids: Sequence[str]) -> None:
        """Mark ``ingest`` items of ``group`` as processed."""
        ...

    async def length(self) -> int:
        """Records retained in the ``positions`` stream (capped by the configured maximum)."""
        ...

    async def close(self) -> None: ...
