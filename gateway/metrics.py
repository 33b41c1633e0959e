"""Prometheus metrics of the gateway: plain module-level objects in one dedicated registry.

Code that counts something imports this module and touches the object::

    from gateway import metrics
    metrics.FRAMES.labels(protocol="gt06", type="login").inc()

Label values are always small closed sets (protocol names, codec error slugs,
frame types, close reasons): never an IMEI, a user id, a token or anything
else a peer chooses, because each distinct value is a time series kept
forever and because metrics are read by people who must not see those
(RELIABILITY.md promise 18). :data:`LABEL_NAMES` is the allow-list; a test
renders the registry after realistic traffic and checks both rules.

All names start with ``fleetgate_``. :func:`render` gives the text exposition
format served at ``/metrics`` by :mod:`gateway.ops_http`.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ACK_LATENCY",
    "BUS_LAG",
    "BUS_LENGTH",
    "CLOSED_CONNECTIONS",
    "COMMIT_BATCH_SIZE",
    "COMMIT_LATENCY",
    "CONNECTIONS",
    "CONNECTIONS_REJECTED",
    "CONNECTIONS_TOTAL",
    "CONTENT_TYPE",
    "CRC_MISMATCHES",
    "DECODE_ERRORS",
    "DUPLICATES_DROPPED",
    "FRAMES",
    "LABEL_NAMES",
    "MQTT_MESSAGES",
    "PROTOCOLS",
    "RECORDS_COMMITTED",
    "REGISTRY",
    "SESSIONS_REPLACED",
    "UNKNOWN_DEVICES",
    "render",
    "set_bus_lag",
]

REGISTRY = CollectorRegistry(auto_describe=True)

# Without this every counter and histogram series gets a twin "_created" gauge in the
# 0.0.4 text format, doubling the scrape for a timestamp Prometheus does not use there.
# The switch is process-wide; fleetgate owns its processes.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client

# The exposition format generate_latest() writes (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PROTOCOLS = ("gt06", "teltonika", "teltonika-udp", "mqtt")

# Every label name any fleetgate metric may use; "le" and "quantile" come from histograms/summaries.
LABEL_NAMES = frozenset({"protocol", "role", "type", "reason", "source", "kind", "le", "quantile"})

# Bus writes: a local append takes well under a millisecond, a Redis round trip
# with AOF fsync a few, an outage the whole 5 s.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

# --- connections ------------------------------------------------------------------------------

CONNECTIONS = Gauge("fleetgate_connections", "Device connections open now.", ["protocol"], registry=REGISTRY)
# Named "opened" because a counter called fleetgate_connections_total would clash with
# the gauge above: the client library reserves the base name of every counter.
CONNECTIONS_TOTAL = Counter(
    "fleetgate_connections_opened_total", "Device connections admitted.", ["protocol"], registry=REGISTRY
)
CONNECTIONS_REJECTED = Counter(
    "fleetgate_connections_rejected_total",
    "Device connections refused (reason: limit_total, limit_per_ip, unknown_device, ...).",
    ["protocol", "reason"],
    registry=REGISTRY,
)
CLOSED_CONNECTIONS = Counter(
    "fleetgate_closed_connections_total",
    "Device connections closed, by close reason (codec error slug, idle, login_timeout, replaced, eof, ...).",
    ["protocol", "reason"],
    registry=REGISTRY,
)
SESSIONS_REPLACED = Counter(
    "fleetgate_sessions_replaced_total",
    "Live sessions closed because the same device connected again.",
    ["protocol"],
    registry=REGISTRY,
)
UNKNOWN_DEVICES = Counter(
    "fleetgate_unknown_devices_total", "Logins from devices not in the registry.", ["protocol"], registry=REGISTRY
)

# --- decoding ---------------------------------------------------------------------------------

FRAMES = Counter("fleetgate_frames_total", "Frames decoded, by frame type.", ["protocol", "type"], registry=REGISTRY)
CRC_MISMATCHES = Counter(
    "fleetgate_crc_mismatches_total",
    "Frames whose CRC differed (rejected or only counted, per the protocol's CRC policy).",
    ["protocol"],
    registry=REGISTRY,
)
DECODE_ERRORS = Counter(
    "fleetgate_decode_errors_total",
    "Codec errors, by the error's reason slug.",
    ["protocol", "reason"],
    registry=REGISTRY,
)
MQTT_MESSAGES = Counter(
    "fleetgate_mqtt_messages_total", "MQTT messages received, by payload kind.", ["kind"], registry=REGISTRY
)

# --- commits ----------------------------------------------------------------------------------

RECORDS_COMMITTED = Counter(
    "fleetgate_records_committed_total",
    "Records written to the bus (source: gt06, teltonika, mqtt, ingest, ...).",
    ["source"],
    registry=REGISTRY,
)
DUPLICATES_DROPPED = Counter(
    "fleetgate_duplicates_dropped_total", "Records the bus dropped as duplicates.", ["source"], registry=REGISTRY
)
COMMIT_LATENCY = Histogram(
    "fleetgate_commit_latency_seconds", "Time one bus write took.", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
ACK_LATENCY = Histogram(
    "fleetgate_ack_latency_seconds",
    "Time from a frame's arrival to its ACK being written.",
    ["protocol"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMMIT_BATCH_SIZE = Histogram(
    "fleetgate_commit_batch_size", "Records per bus write.", buckets=_BATCH_BUCKETS, registry=REGISTRY
)
BUS_LAG = Gauge(
    "fleetgate_bus_lag_seconds",
    "Age of the newest committed record's received_at when it was committed.",
    registry=REGISTRY,
)
BUS_LENGTH = Gauge("fleetgate_bus_length", "Records retained in the positions stream.", registry=REGISTRY)


def set_bus_lag(received_at: datetime, now: datetime | None = None) -> None:
    """Set :data:`BUS_LAG` from the newest committed record's ``received_at`` (aware datetime)."""
    now = now or datetime.now(UTC)
    BUS_LAG.set(max(0.0, (now - received_at).total_seconds()))


def render() -> bytes:
    """The registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(REGISTRY)


class _ProcessCollector(Collector):
    """Open and maximum file descriptors, resident memory and CPU time of this process.

    prometheus-client's own ProcessCollector goes silent when ``/proc/stat`` is
    hidden, which the systemd units do (``ProcSubset=pid``); this one reads only
    ``/proc/self`` and ``getrusage``.
    """

    def collect(self) -> Iterable[Metric]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily(
            "fleetgate_process_cpu_seconds", "User and system CPU time.", value=usage.ru_utime + usage.ru_stime
        )
        yield GaugeMetricFamily(
            "fleetgate_process_max_fds",
            "Open file descriptor limit.",
            value=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        yield GaugeMetricFamily(
            "fleetgate_process_uptime_seconds", "Seconds since the metrics module was loaded.", value=_uptime()
        )
        try:
            fds = len(os.listdir("/proc/self/fd"))
            with open("/proc/self/statm", "rb") as statm:
                rss_pages = int(statm.read().split()[1])
        except (OSError, IndexError, ValueError):
            return
        yield GaugeMetricFamily("fleetgate_process_open_fds", "Open file descriptors.", value=fds)
        yield GaugeMetricFamily(
            "fleetgate_process_resident_memory_bytes", "Resident memory.", value=rss_pages * resource.getpagesize()
        )


_STARTED = time.monotonic()


def _uptime() -> float:
    return time.monotonic() - _STARTED


REGISTRY.register(_ProcessCollector())

# Series for every protocol exist from the start, so dashboards and rate() see zeros, not gaps.
for _protocol in PROTOCOLS:
    CONNECTIONS.labels(protocol=_protocol)
    CONNECTIONS_TOTAL.labels(protocol=_protocol)
    SESSIONS_REPLACED.labels(protocol=_protocol)
    UNKNOWN_DEVICES.labels(protocol=_protocol)
    CRC_MISMATCHES.labels(protocol=_protocol)
    ACK_LATENCY.labels(protocol=_protocol)
del _protocol
