"""The state store: contract in :mod:`gateway.state.base`, drivers ``sqlite`` and ``redis``."""

from gateway.state.base import StateStore

__all__ = ["StateStore"]
