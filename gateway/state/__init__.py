"""The state store: contract in :mod:`gateway.state.base`, drivers ``sqlite`` and ``redis``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.settings import StateSettings
from gateway.state.base import StateStore

__all__ = ["StateStore", "fix_time_ms", "open_state"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def open_state(settings: StateSettings) -> StateStore:
    """The driver ``settings.driver`` names; only that driver's modules are imported."""
    if settings.driver == "redis":
        from gateway.state.redis import RedisStateStore

        return RedisStateStore(settings)
    from gateway.state.sqlite import SqliteStateStore

    return SqliteStateStore(settings)


def fix_time_ms(fix_time: datetime) -> int:
    """Milliseconds since the epoch, exact (integer arithmetic, no float rounding); naive times count as UTC."""
    if fix_time.tzinfo is None:
        fix_time = fix_time.replace(tzinfo=UTC)
    return (fix_time - _EPOCH) // _MS
