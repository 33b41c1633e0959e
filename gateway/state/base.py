"""The state store contract: the device registry and the last known position per asset.

Two drivers implement it: :mod:`gateway.state.sqlite` (embedded mode, one
file) and :mod:`gateway.state.redis` (distributed mode). One conformance
suite (``tests/test_state_conformance.py``) runs against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.records import Device, TrackedPosition


class StateStore(Protocol):
    async def get_device(self, imei: str) -> Device | None: ...

    async def put_device(self, device: Device) -> None:
        """Insert or replace the device with this IMEI."""
        ...

    async def remove_device(self, imei: str) -> bool:
        """Remove; True if it existed."""
        ...

    async def list_devices(self, company_id: str | None = None) -> list[Device]:
        """All devices (of one company when given), ordered by IMEI."""
        ...

    async def save_last_positions(self, records: Sequence[TrackedPosition]) -> None:
        """Keep, per asset, the record with the newest fix time (older ones never overwrite newer)."""
        ...

    async def last_position(self, asset_id: str) -> TrackedPosition | None: ...

    async def last_positions(self, company_id: str) -> list[TrackedPosition]:
        """The last known position of every asset of a company, ordered by asset id."""
        ...

    async def close(self) -> None: ...
