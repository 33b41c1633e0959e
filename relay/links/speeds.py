"""Recent moving speed per asset, for ETAs: fed with every record the relay reads from the bus."""

from __future__ import annotations

import collections
from datetime import datetime, timedelta

from gateway.records import TrackedPosition


class RecentSpeeds:
    """The average speed of an asset's moving records over the last ``window_s`` of fix time."""

    def __init__(self, window_s: float = 600.0, max_samples: int = 120) -> None:
        self.window = timedelta(seconds=window_s)
        self.max_samples = max_samples
        self._samples: dict[str, collections.deque[tuple[datetime, float]]] = {}

    def observe(self, record: TrackedPosition) -> None:
        """Remember ``record``'s speed when the asset was moving (stops do not drag the average down)."""
        if not record.moving or record.speed_kmh <= 0:
            return
        samples = self._samples.get(record.asset_id)
        if samples is None:
            samples = self._samples[record.asset_id] = collections.deque(maxlen=self.max_samples)
        samples.append((record.fix_time, record.speed_kmh))

    def recent_speed(self, asset_id: str, now: datetime) -> float | None:
        """Mean km/h of the moving records within the window before ``now``; None when there are none."""
        samples = self._samples.get(asset_id)
        if not samples:
            return None
        cutoff = now - self.window
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        if not samples:
            del self._samples[asset_id]
            return None
        return sum(speed for _, speed in samples) / len(samples)
