"""Metrics (promise 18: no IMEIs, user ids or tokens in labels) and the ops HTTP server."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.ops_http import start_ops_server
from trackcodecs import errors

IMEI_LIKE = re.compile(r"\d{14,16}")


def codec_reasons() -> set[str]:
    """Every reason slug a codec can raise: the real label values of decode_errors_total."""
    found: set[str] = set()
    todo: list[type[errors.CodecError]] = [errors.CodecError]
    while todo:
        cls = todo.pop()
        found.add(cls.reason)
        todo.extend(cls.__subclasses__())
    return found


def register_realistic_traffic() -> None:
    """Touch every public metric the way the gateway does, with the label values it uses."""
    for protocol in metrics.PROTOCOLS:
        metrics.CONNECTIONS.labels(protocol=protocol).inc()
        metrics.CONNECTIONS_TOTAL.labels(protocol=protocol).inc()
        for reason in ("limit_total", "limit_per_ip", "unknown_device"):
            metrics.CONNECTIONS_REJECTED.labels(protocol=protocol, reason=reason).inc()
        for reason in ("eof", "idle", "login_timeout", "replaced", "shutdown", *codec_reasons()):
            metrics.CLOSED_CONNECTIONS.labels(protocol=protocol, reason=reason).inc()
            metrics.DECODE_ERRORS.labels(protocol=protocol, reason=reason).inc()
        for frame_type in ("login", "heartbeat", "location", "alarm", "avl", "command_reply"):
            metrics.FRAMES.labels(protocol=protocol, type=frame_type).inc()
        metrics.CRC_MISMATCHES.labels(protocol=protocol).inc()
        metrics.UNKNOWN_DEVICES.labels(protocol=protocol).inc()
        metrics.SESSIONS_REPLACED.labels(protocol=protocol).inc()
        metrics.ACK_LATENCY.labels(protocol=protocol).observe(0.003)
    for source in (*metrics.PROTOCOLS, "ingest"):
        metrics.RECORDS_COMMITTED.labels(source=source).inc(25)
        metrics.DUPLICATES_DROPPED.labels(source=source).inc()
    for kind in ("json", "teltonika"):
        metrics.MQTT_MESSAGES.labels(kind=kind).inc()
    metrics.COMMIT_LATENCY.observe(0.0012)
    metrics.COMMIT_BATCH_SIZE.observe(25)
    metrics.set_bus_lag(datetime.now(UTC) - timedelta(milliseconds=40))
    metrics.BUS_LENGTH.set(123_456)


def label_problems(exposition: str) -> list[str]:
    problems = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name not in metrics.LABEL_NAMES:
                    problems.append(f"{sample.name}: label name {name!r} not allowed")
                if IMEI_LIKE.search(value):
                    problems.append(f"{sample.name}: label {name}={value!r} looks like an IMEI")
    return problems


def test_labels_hold_no_identifiers() -> None:
    register_realistic_traffic()
    exposition = metrics.render().decode()
    assert label_problems(exposition) == []
    assert "fleetgate_frames_total" in exposition


def test_label_check_catches_a_leak() -> None:
    registry = CollectorRegistry()
    leaky = Counter("fleetgate_leaky_total", "", ["imei"], registry=registry)
    leaky.labels(imei="356307042441013").inc()
    problems = label_problems(generate_latest(registry).decode())
    assert len(problems) == 2


def test_every_name_is_prefixed_and_every_label_allowed() -> None:
    register_realistic_traffic()
    families = list(text_string_to_metric_families(metrics.render().decode()))
    assert families
    assert all(family.name.startswith("fleetgate_") for family in families)
    names = {family.name for family in families}
    expected = {
        "fleetgate_connections",
        "fleetgate_connections_opened",
        "fleetgate_connections_rejected",
        "fleetgate_closed_connections",
        "fleetgate_frames",
        "fleetgate_crc_mismatches",
        "fleetgate_decode_errors",
        "fleetgate_records_committed",
        "fleetgate_duplicates_dropped",
        "fleetgate_unknown_devices",
        "fleetgate_commit_latency_seconds",
        "fleetgate_ack_latency_seconds",
        "fleetgate_commit_batch_size",
        "fleetgate_bus_lag_seconds",
        "fleetgate_bus_length",
        "fleetgate_sessions_replaced",
        "fleetgate_mqtt_messages",
        "fleetgate_process_open_fds",
    }
    assert expected <= names


def test_commit_latency_buckets_span_half_a_millisecond_to_five_seconds() -> None:
    buckets = metrics.COMMIT_LATENCY._upper_bounds
    assert buckets[0] == 0.0005
    assert buckets[-2] == 5.0  # the last is +Inf


def test_bus_lag_from_received_at() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    metrics.set_bus_lag(now - timedelta(seconds=2), now)
    assert metrics.BUS_LAG._value.get() == 2.0
    metrics.set_bus_lag(now + timedelta(seconds=2), now)  # clock skew never gives a negative lag
    assert metrics.BUS_LAG._value.get() == 0.0


# --- the ops HTTP server ----------------------------------------------------------------------

HealthState = dict[str, Any]


@pytest.fixture
def health_state() -> HealthState:
    return {"status": "ok", "bus": "memory"}


@pytest.fixture
async def ops_port(health_state: HealthState) -> AsyncIterator[int]:
    def health() -> dict[str, Any]:
        if health_state.get("raise"):
            raise RuntimeError("secret internals")
        return dict(health_state)

    server = await start_ops_server("127.0.0.1", 0, health, read_timeout=0.5)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request with urllib, in a thread, as a scraper would make it."""

    def call() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(call)


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_metrics_endpoint_parses(ops_port: int) -> None:
    metrics.FRAMES.labels(protocol="teltonika", type="avl").inc()
    status, headers, body = await http(ops_port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert "fleetgate_frames" in names


async def test_healthz_ok(ops_port: int) -> None:
    status, headers, body = await http(ops_port, "/healthz")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "bus": "memory"}


async def test_healthz_unhealthy(ops_port: int, health_state: HealthState) -> None:
    health_state["status"] = "degraded"
    status, _, body = await http(ops_port, "/healthz")
    assert status == 503
    assert json.loads(body)["status"] == "degraded"


async def test_healthz_check_raising_is_503_without_internals(ops_port: int, health_state: HealthState) -> None:
    health_state["raise"] = True
    status, _, body = await http(ops_port, "/healthz")
    assert status == 503
    assert b"secret" not in body


@pytest.mark.parametrize(
    ("path", "method", "expected"),
    [("/nope", "GET", 404), ("/metrics", "POST", 405), ("/healthz", "DELETE", 405), ("/metrics?x=1", "GET", 200)],
)
async def test_routing(ops_port: int, path: str, method: str, expected: int) -> None:
    status, headers, _ = await http(ops_port, path, method)
    assert status == expected
    if expected == 405:
        assert headers["Allow"] == "GET, HEAD"


async def test_head_has_no_body(ops_port: int) -> None:
    answer = await raw(ops_port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b""


async def test_oversize_header_is_431(ops_port: int) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 9000 + b"\r\n\r\n"
    answer = await raw(ops_port, request)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_header_just_under_the_limit_is_served(ops_port: int) -> None:
    start = b"GET /healthz HTTP/1.1\r\nX-Filler: "
    request = start + b"a" * (8 * 1024 - len(start) - 4) + b"\r\n\r\n"
    assert len(request) == 8 * 1024
    answer = await raw(ops_port, request)
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_garbage_request_line_is_400(ops_port: int) -> None:
    answer = await raw(ops_port, b"\x16\x03\x01 hello\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_slow_request_times_out(ops_port: int) -> None:
    answer = await raw(ops_port, b"GET /metrics HTTP/1.1\r\n")  # never finishes the head
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_connection_limit_sheds_load(health_state: HealthState) -> None:
    server = await start_ops_server("127.0.0.1", 0, lambda: health_state, max_connections=1, read_timeout=2)
    port = server.sockets[0].getsockname()[1]
    try:
        _, idle_writer = await asyncio.open_connection("127.0.0.1", port)  # holds the only slot
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 1) == b""  # closed unanswered
        writer.close()
        await writer.wait_closed()
        idle_writer.close()
        await idle_writer.wait_closed()
        await asyncio.sleep(0.05)
        assert (await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    finally:
        server.close()
        await server.wait_closed()
