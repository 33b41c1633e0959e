"""The state store: contract in :mod:`gateway.state.base`, drivers ``sqlite`` and ``redis``."""

from __future__ import annotations

from gateway.records import fix_time_ms
from gateway.settings import StateSettings
from gateway.state.base import StateStore

__all__ = ["StateStore", "fix_time_ms", "open_state"]


def open_state(settings: StateSettings) -> StateStore:
    """The driver ``settings.driver`` names; only that driver's modules are imported."""
    if settings.driver == "redis":
        from gateway.state.redis import RedisStateStore

        return RedisStateStore(settings)
    from gateway.state.sqlite import SqliteStateStore

    return SqliteStateStore(settings)
