"""The position bus: contract in :mod:`gateway.bus.base`, drivers ``memory`` and ``redis``."""

from gateway.bus.base import Bus, BusError
from gateway.bus.memory import MemoryBus
from gateway.bus.redis import RedisBus
from gateway.settings import BusSettings

__all__ = ["Bus", "BusError", "MemoryBus", "RedisBus", "open_bus"]


def open_bus(settings: BusSettings) -> Bus:
    """The driver ``settings.driver`` names. Nothing connects yet (``RedisBus.connect`` checks Redis up front)."""
    if settings.driver == "redis":
        return RedisBus(settings)
    return MemoryBus(settings)
