"""Prometheus metrics of the relay, in the gateway's registry (one ``/metrics`` per process).

Labels are closed sets only (see :mod:`gateway.metrics`): ``protocol`` is
``native`` or ``pusher``, ``role`` is ``driver``, ``office``, ``admin`` or
``none`` (not yet authenticated), ``reason`` a close or failure slug. Never a
user id, company id, token or channel name.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gateway.metrics import REGISTRY

WS_CONNECTIONS = Gauge(
    "fleetgate_ws_connections", "WebSocket connections open now.", ["protocol", "role"], registry=REGISTRY
)
WS_OPENED = Counter("fleetgate_ws_opened_total", "WebSocket connections accepted.", ["protocol"], registry=REGISTRY)
WS_CLOSED = Counter(
    "fleetgate_ws_closed_total",
    "WebSocket connections closed, by reason (client, unauthorized, token_expired, revoked, ping_timeout, "
    "slow_consumer, too_big, limit_reached, ...).",
    ["protocol", "reason"],
    registry=REGISTRY,
)
WS_REJECTED = Counter(
    "fleetgate_ws_rejected_total",
    "WebSocket handshakes refused (reason: bad_path, bad_request, limit_total, ...).",
    ["reason"],
    registry=REGISTRY,
)
MESSAGES_IN = Counter(
    "fleetgate_ws_messages_in_total", "Client messages received, by action.", ["protocol", "type"], registry=REGISTRY
)
MESSAGES_OUT = Counter(
    "fleetgate_ws_messages_out_total",
    "Messages written to clients (type: location, control).",
    ["protocol", "type"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "fleetgate_auth_failures_total",
    "Failed or ended authentications (reason: malformed, expired, invalid_signature, invalid_claims, unknown_key, "
    "missing, revoked, user_mismatch, role_mismatch, timeout, not_authenticated, token_expired).",
    ["reason"],
    registry=REGISTRY,
)
CLIENT_ERRORS = Counter(
    "fleetgate_ws_errors_total",
    "Error messages sent to clients (type: InvalidAction, Forbidden, BadPayload, RateLimited, LimitReached).",
    ["protocol", "type"],
    registry=REGISTRY,
)
SLOW_CONSUMERS = Counter(
    "fleetgate_slow_consumer_disconnects_total",
    "Clients disconnected because their send buffer overflowed.",
    ["protocol"],
    registry=REGISTRY,
)
FANOUT_LATENCY = Histogram(
    "fleetgate_fanout_latency_seconds",
    "Time from a record's arrival at the gateway (received_at) to its frames being queued for every subscriber "
    "(written at the next flush, at most flush_interval_ms later).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
RECORDS_RELAYED = Counter(
    "fleetgate_records_relayed_total", "Records read from the bus and fanned out.", registry=REGISTRY
)
