"""``fleetgate run`` as a process: says where to connect, ingests, serves /metrics and /healthz, SIGTERM exits."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import FIXTURE_CASES
from procs import FLEETGATE, GatewayProcess

IMEI_PACKET = struct.pack(">H", 15) + b"356307042441013"
AVL_2 = next(f.data for f in FIXTURE_CASES if f.id == "teltonika/dev-tltcp-003")


def test_run_ingests_reports_and_stops_on_sigterm(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, "run", FLEETGATE_REGISTRY__UNKNOWN_DEVICES="register").start()
    try:
        with socket.create_connection(("127.0.0.1", gw.ports["teltonika"]), timeout=5) as s:
            s.sendall(IMEI_PACKET)
            assert s.recv(1) == b"\x01"
            s.sendall(AVL_2)
            assert s.recv(4) == b"\x00\x00\x00\x02"
        base = f"http://127.0.0.1:{gw.ports['metrics']}"
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'fleetgate_records_committed_total{source="teltonika"} 2.0' in body
        assert "356307042441013" not in body
        health = urllib.request.urlopen(base + "/healthz", timeout=5)
        assert health.status == 200
        tail = subprocess.run(
            [FLEETGATE, "tail", "--from-start", "--count", "2"], env=gw.env, capture_output=True, text=True, timeout=20
        )
        lines = [json.loads(line) for line in tail.stdout.splitlines()]
        assert [r["asset_id"] for r in lines] == ["356307042441013"] * 2
        assert lines[0]["fix_time"] < lines[1]["fix_time"]
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert gw.wait(10) == 0
        assert time.monotonic() - started < 10
        out = gw.output()
        assert f"teltonika      tcp://127.0.0.1:{gw.ports['teltonika']}" in out
        assert "metrics" in out and "/healthz" in out
    finally:
        gw.stop()


def test_simulator_records_reach_the_bus_and_show_in_tail(tmp_path: Path) -> None:
    """The README's walk-through: fleetgate run, fleetgate simulate --register, fleetgate tail."""
    gw = GatewayProcess(tmp_path, "run").start()
    try:
        for protocol, imei_base in (("teltonika", "35000000000000"), ("gt06", "86000000000000")):
            sim = subprocess.run(
                [FLEETGATE, "simulate", "--protocol", protocol, "--devices", "3", "--records", "30", "--interval", "0",
                 "--port", str(gw.ports[protocol]), "--imei-base", imei_base, "--register"],
                env=gw.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert sim.returncode == 0, sim.stdout + sim.stderr
        tail = subprocess.run(
            [FLEETGATE, "tail", "--from-start", "--count", "60"], env=gw.env, capture_output=True, text=True, timeout=30
        )
        records = [json.loads(line) for line in tail.stdout.splitlines()]
        assert len(records) == 60
        assert {r["source"] for r in records} == {"teltonika", "gt06"}
        assert len({r["id"] for r in records}) == 60
    finally:
        gw.stop()
