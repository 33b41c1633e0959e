"""The position bus: contract in :mod:`gateway.bus.base`, drivers ``memory`` and ``redis``."""

from gateway.bus.base import Bus, BusError

__all__ = ["Bus", "BusError"]
