"""Channels and fan-out: each record is encoded once per channel and its frame written to every member.

A channel is a string key; its members are sockets (:class:`relay.wsserver.WsConnection`).
The protocols own their key spaces (the native protocol uses ``c:{company}``
and ``a:{company}:{asset}``): keys are built from server-side data and
verified token claims only, so a record of one company can never reach a
channel of another (ARCHITECTURE.md, tenancy).

Each protocol registers a record handler; :meth:`Hub.publish` calls every
handler, which encodes the record once for the channels that have members and
pushes the frame, then asks the server to flush once for the whole turn.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from gateway.records import TrackedPosition
from relay import metrics
from relay.wsserver import WsConnection, WsServer

RecordHandler = Callable[[TrackedPosition], None]


class Hub:
    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.channels: dict[str, set[WsConnection]] = {}
        self.handlers: list[RecordHandler] = []
        self.asset_company: dict[str, str] = {}  # learnt from records: which company an asset belongs to

    def join(self, channel: str, conn: WsConnection) -> None:
        members = self.channels.get(channel)
        if members is None:
            self.channels[channel] = {conn}
        else:
            members.add(conn)

    def leave(self, channel: str, conn: WsConnection) -> None:
        members = self.channels.get(channel)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.channels[channel]

    def members(self, channel: str) -> set[WsConnection] | None:
        return self.channels.get(channel)

    def publish(self, record: TrackedPosition) -> None:
        """Fan ``record`` out through every protocol, then flush all pushed frames at the end of this turn."""
        self.asset_company[record.asset_id] = record.company_id
        for handler in self.handlers:
            handler(record)
        self.server.schedule_flush()
        metrics.RECORDS_RELAYED.inc()
        metrics.FANOUT_LATENCY.observe(max(0.0, (datetime.now(UTC) - record.received_at).total_seconds()))
