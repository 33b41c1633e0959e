"""``fleetgate decode``: the JSON schema for all three protocols, input forms, and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_CASES, ROOT

SCRIPT = Path(sys.executable).with_name("fleetgate")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fleetgate"]
KEYS = ["protocol", "ok", "error", "crc_ok", "reply_hex", "events"]
POSITION_KEYS = {"fix_time", "lat", "lng", "speed_kmh", "course", "altitude", "satellites", "valid", "io"}

LOGIN = "78 78 0d 01 01 23 45 67 89 01 23 45 00 01 8c dd 0d 0a"
BAD_CRC = "78780d01012345678901234500018cde0d0a"  # LOGIN with its CRC's last byte changed
TELTONIKA = (
    "000000000000003608010000016b40d8ea30010000000000000000000000000000000105021503010101425e0f01f10000601a014e0000"
    "000000000000010000c7cf"
)
UDP = (
    "003dcafe0105000f33353230393330383634303336353508010000016b4f815b30010000000000000000000000000000000103021503"
    "010101425dbc000001"
)


def decode(*args: str, stdin: str = "") -> tuple[int, list[dict[str, object]]]:
    proc = subprocess.run(
        [*COMMAND, "decode", *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()] if "--json" in args else []
    return proc.returncode, lines


def check_schema(obj: dict[str, object]) -> None:
    assert list(obj) == KEYS
    assert obj["protocol"] in ("gt06", "teltonika", "teltonika-udp")
    assert isinstance(obj["ok"], bool)
    assert obj["error"] is None if obj["ok"] else isinstance(obj["error"], str)
    assert obj["crc_ok"] in (None, True, False)
    assert obj["reply_hex"] is None or (
        isinstance(obj["reply_hex"], str) and obj["reply_hex"] == obj["reply_hex"].lower()
    )
    assert isinstance(obj["events"], list)
    for event in obj["events"]:
        assert isinstance(event, dict) and isinstance(event["type"], str)
        if event["type"] == "position":
            assert set(event) >= POSITION_KEYS
            assert event["fix_time"] is None or str(event["fix_time"]).endswith("Z")
            assert isinstance(event["io"], dict)
        if event["type"] in ("login", "imei"):
            assert isinstance(event["imei"], str)


def test_three_protocols_in_one_run_from_arguments() -> None:
    status, out = decode("--json", LOGIN, TELTONIKA, "0x" + UDP)
    assert status == 0
    assert [o["protocol"] for o in out] == ["gt06", "teltonika", "teltonika-udp"]
    for obj in out:
        check_schema(obj)
    assert out[0]["reply_hex"] == "787805010001d9dc0d0a"
    assert out[0]["events"][0]["imei"] == "123456789012345"
    assert out[1]["reply_hex"] == "00000001" and out[1]["crc_ok"] is True
    assert out[2]["reply_hex"] == "0005cafe010501" and out[2]["crc_ok"] is None
    assert out[2]["events"][0]["type"] == "position" and out[2]["events"][0]["imei"] == "352093086403655"


def test_stdin_one_capture_per_line_and_errors() -> None:
    status, out = decode("--json", stdin=f"{LOGIN}\n\n{BAD_CRC}\nzz-not-hex\n")
    assert status == 1
    assert len(out) == 3
    for obj in out:
        check_schema(obj)
    assert out[0]["ok"] is True
    assert (out[1]["ok"], out[1]["error"], out[1]["crc_ok"], out[1]["reply_hex"]) == (False, "bad_crc", False, None)
    assert (out[2]["ok"], out[2]["error"]) == (False, "bad_hex")


def test_forced_protocol_and_crc_count() -> None:
    status, out = decode("--json", "--protocol", "gt06", "--crc", "count", BAD_CRC)
    assert status == 0
    assert out[0]["ok"] is True and out[0]["crc_ok"] is False
    assert out[0]["events"][0]["crc_ok"] is False


def test_several_positions_in_one_frame_come_out_in_order() -> None:
    several = next(f for f in FIXTURE_CASES if f.protocol == "teltonika" and len(f.expected["events"]) >= 2)
    status, out = decode("--json", "--protocol", "teltonika", several.data.hex())
    assert status == (0 if several.expected["ok"] else 1)
    positions = [e for e in out[0]["events"] if e["type"] == "position"]  # type: ignore[union-attr,index]
    assert [p["record"] for p in positions] == list(range(len(positions)))


@pytest.mark.parametrize("fixture", FIXTURE_CASES[:: max(1, len(FIXTURE_CASES) // 12)], ids=lambda f: f.id)
def test_cli_matches_fixture(fixture: object) -> None:
    f = fixture  # a conftest.Fixture; the CLI uses the real clock, so skip the one time-dependent reply
    expected = dict(f.expected)  # type: ignore[attr-defined]
    status, out = decode("--json", "--protocol", f.protocol, "--crc", f.crc_policy, f.data.hex())  # type: ignore[attr-defined]
    if any(e["type"] == "time_request" for e in expected["events"]):
        out[0]["reply_hex"] = expected["reply_hex"] = None
    assert out[0] == expected
    assert status == (0 if expected["ok"] else 1)


def test_readable_output() -> None:
    proc = subprocess.run([*COMMAND, "decode", LOGIN, TELTONIKA], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "login" in proc.stdout and "imei=123456789012345" in proc.stdout
    assert "position  2019-06-10T10:04:46Z" in proc.stdout
    assert "reply     00000001" in proc.stdout


def test_demo_runs() -> None:
    proc = subprocess.run([*COMMAND, "decode", "--demo"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.count("status ok") == 7
