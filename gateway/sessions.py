"""Live device sessions: one per IMEI, and the connection limits."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from gateway import metrics


class Closable(Protocol):
    protocol_name: str

    def close(self, reason: str) -> None: ...


class SessionTable:
    """Which connection currently speaks for each IMEI; a new login replaces (closes) the old connection."""

    def __init__(self) -> None:
        self._by_imei: dict[str, Closable] = {}

    def bind(self, imei: str, connection: Closable) -> None:
        old = self._by_imei.get(imei)
        self._by_imei[imei] = connection
        if old is not None and old is not connection:
            metrics.SESSIONS_REPLACED.labels(protocol=connection.protocol_name).inc()
            old.close("replaced")

    def release(self, imei: str, connection: Closable) -> None:
        if self._by_imei.get(imei) is connection:
            del self._by_imei[imei]

    def get(self, imei: str) -> Closable | None:
        return self._by_imei.get(imei)

    def __len__(self) -> int:
        return len(self._by_imei)


class ConnectionLimits:
    """Connections in total and per source IP, across all TCP listeners."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        if self.total >= self.max_total:
            return "limit_total"
        if self.per_ip[ip] >= self.max_per_ip:
            return "limit_per_ip"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
