"""The vendor example frames (fixtures/vendor-samples.jsonl) decode to the values the vendors print.

The expectations here are the vendor documents' own, in their own schema,
so this test does not depend on how our fixtures were written.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import FIXTURES

from trackcodecs import (
    Alarm,
    AvlPacket,
    Command,
    CommandResponse,
    Event,
    Heartbeat,
    ImeiPacket,
    Location,
    Login,
    gt06,
    teltonika,
    teltonika_udp,
)
from trackcodecs.gt06 import Gt06Decoder
from trackcodecs.teltonika import TeltonikaDecoder

SAMPLES = [json.loads(line) for line in (FIXTURES / "vendor-samples.jsonl").read_text().splitlines() if line.strip()]
NOW = datetime(2015, 12, 29, 0, 0, 21, tzinfo=UTC)
STATUS_KEYS = ("acc", "charging", "gps_tracking", "alarm_bits", "armed", "fuel_cut", "voltage_level", "gsm_signal")


def _one_event(decoder: Gt06Decoder | TeltonikaDecoder, data: bytes) -> Event:
    decoder.receive_data(data)
    decoder.receive_eof()
    events = decoder.events()
    assert len(events) == 1
    return events[0]


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s["protocol"] == "gt06"], ids=lambda s: s["id"])
def test_gt06_sample(sample: dict[str, Any]) -> None:
    expect = sample["expect"]
    event = _one_event(Gt06Decoder(), bytes.fromhex(sample["hex"]))
    assert f"0x{event.msg_type:02x}" == expect["protocol"]  # type: ignore[attr-defined]
    assert event.serial == expect["serial"]  # type: ignore[attr-defined]
    reply = gt06.reply_for(event, NOW)
    if "response_hex" in expect:
        assert reply is not None and reply.hex() == expect["response_hex"]
    if "optional_response_hex" in expect:
        assert reply is None  # the vendor requires none; the builder still makes the optional one right
        assert gt06.ack(event.msg_type, event.serial).hex() == expect["optional_response_hex"]  # type: ignore[attr-defined]
    if "response_layout" in expect:  # 0x8A: answered with the server's UTC time
        assert reply == bytes.fromhex("78780b8a0f0c1d0000150006f0860d0a")
    if "imei" in expect:
        assert isinstance(event, Login) and event.imei == expect["imei"]
    if "fix_time" in expect:
        assert isinstance(event, Location | Alarm) and event.position is not None
        p = event.position
        assert p.fix_time is not None and p.fix_time.isoformat().replace("+00:00", "Z") == expect["fix_time"]
        assert (round(p.lat, 6), round(p.lng, 6)) == (expect["lat"], expect["lng"])
        assert (p.satellites, p.speed_kmh, p.course) == (expect["satellites"], expect["speed_kmh"], expect["course"])
        assert p.valid is expect["positioned"]
    if "acc" in expect:
        assert isinstance(event, Alarm | Heartbeat)
        status = event.status
        assert {k: getattr(status, k) for k in STATUS_KEYS} == {k: expect[k] for k in STATUS_KEYS}
        assert status.alarm_code == expect["alarm_code"]
    if "language" in expect:
        assert event.status.language == expect["language"]  # type: ignore[attr-defined]


def _check_first_record(packet: AvlPacket, expect: dict[str, Any]) -> None:
    assert packet.codec == int(expect["codec"], 16)
    assert len(packet.positions) == expect["record_count"]
    first, want = packet.positions[0], expect["first_record"]
    assert first.fix_time is not None
    assert first.fix_time.isoformat(timespec="milliseconds").replace("+00:00", "Z") == want["timestamp"]
    assert (first.priority, round(first.lat, 7), round(first.lng, 7)) == (want["priority"], want["lat"], want["lng"])
    assert (first.altitude, first.course, first.satellites) == (want["altitude"], want["angle"], want["satellites"])
    assert (first.speed_kmh, first.event_io_id) == (want["speed_kmh"], want["event_io_id"])
    assert first.generation_type == want.get("generation_type")
    assert {str(k): v for k, v in first.io.items() if str(k) in want["io_raw"]} == want["io_raw"]


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s["protocol"] == "teltonika-tcp"], ids=lambda s: s["id"])
def test_teltonika_tcp_sample(sample: dict[str, Any]) -> None:
    expect = sample["expect"]
    event = _one_event(TeltonikaDecoder(), bytes.fromhex(sample["hex"]))
    if sample["kind"] == "imei":
        assert isinstance(event, ImeiPacket)
        assert (event.imei, event.imei_valid) == (expect["imei"], expect["imei_valid"])
        assert teltonika.reply_for(event) == bytes.fromhex(expect["response_hex"])
    elif sample["kind"] == "avl":
        assert isinstance(event, AvlPacket)
        _check_first_record(event, expect)
        assert teltonika.ack_for(event).hex() == expect["ack_hex"]
    else:
        assert isinstance(event, Command | CommandResponse)
        assert event.codec == int(expect["codec"], 16)
        assert event.text == expect["text"]
        is_command = expect["message_type"] == "0x05"
        assert isinstance(event, Command) is is_command
        assert teltonika.reply_for(event) is None  # command responses are never ACKed
        if is_command:
            assert teltonika.encode_command(event.text) == bytes.fromhex(sample["hex"])


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s["protocol"] == "teltonika-udp"], ids=lambda s: s["id"])
def test_teltonika_udp_sample(sample: dict[str, Any]) -> None:
    expect = sample["expect"]
    packet = teltonika_udp.decode_datagram(bytes.fromhex(sample["hex"]))
    assert isinstance(packet, AvlPacket)
    assert packet.imei == expect["imei"]
    assert (f"{packet.packet_id:04x}", packet.avl_packet_id) == (expect["packet_id"], expect["avl_packet_id"])
    _check_first_record(packet, expect)
    assert teltonika_udp.ack_for(packet).hex() == expect["ack_hex"]


def test_every_sample_is_covered() -> None:
    assert {s["protocol"] for s in SAMPLES} == {"gt06", "teltonika-tcp", "teltonika-udp"}
    assert len(SAMPLES) >= 15
