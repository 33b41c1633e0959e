"""The systemd units (promise 19): settings everywhere, systemd-analyze where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
UNIT_IDS = [unit.name for unit in UNITS]
COMMANDS = {"fleetgate.service": "run", "fleetgate-gateway.service": "gateway", "fleetgate-relay.service": "relay"}
INSTALLED = "/opt/fleetgate/.venv/bin/fleetgate"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; keys may repeat (SystemCallFilter=), so each maps to all its values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(path: Path) -> dict[str, str]:
    """The [Service] section, last value of each key winning (as systemd does for scalar settings)."""
    return {key: values[-1] for key, values in parse_unit(path)["Service"].items()}


def test_every_mode_has_a_unit() -> None:
    assert set(UNIT_IDS) == set(COMMANDS)


@pytest.mark.parametrize("unit", UNITS, ids=UNIT_IDS)
def test_unit_settings(unit: Path) -> None:
    settings = service(unit)
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure"
    assert int(settings["LimitNOFILE"]) >= 65536
    assert int(settings["WatchdogSec"]) > 0
    assert settings["KillSignal"] == "SIGTERM"
    assert int(settings["TimeoutStopSec"]) > 10  # promise 5 lets the drain take up to 10 s
    assert settings["ExecStart"] == f"{INSTALLED} {COMMANDS[unit.name]} --config /etc/fleetgate/fleetgate.toml"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["MemoryDenyWriteExecute"] == "yes"
    assert settings["User"] == "fleetgate"
    assert parse_unit(unit)["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.fixture
def runnable_units(tmp_path: Path) -> Path:
    """The units copied next to each other, ExecStart pointing at this venv's fleetgate (verify checks it exists)."""
    script = Path(sys.executable).with_name("fleetgate")
    executable = script if script.exists() else Path(sys.executable)
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(executable)))
    return tmp_path


@needs_analyze
@pytest.mark.parametrize("unit", UNIT_IDS)
def test_systemd_analyze_verify(runnable_units: Path, unit: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(runnable_units / unit)], capture_output=True, text=True, timeout=60
    )
    # Complaints about other units installed on the host are not ours to fix; complaints about ours are.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "fleetgate" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=UNIT_IDS)
def test_systemd_analyze_security(unit: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


# MemoryDenyWriteExecute=yes must not break Python. Linux >= 6.3 offers the same rule per process
# (prctl PR_SET_MDWE, inherited across exec), so the check runs without systemd.
_MDWE_CHILD = textwrap.dedent(
    """
    import asyncio, ctypes, mmap, sqlite3, ssl
    import msgspec, prometheus_client, redis.asyncio
    from gateway import metrics, ops_http, sdnotify
    import trackcodecs

    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        raise SystemExit("write+execute mapping was allowed: MDWE is not in force")

    async def main():
        server = await ops_http.start_ops_server("127.0.0.1", 0, lambda: {"status": "ok"})
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"GET /metrics HTTP/1.1\\r\\n\\r\\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
        server.close()
        await server.wait_closed()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    sqlite3.connect(":memory:").execute("select 1")
    assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7  # libffi closures
    ssl.create_default_context()
    print("ok")
    """
)
_MDWE_PARENT = textwrap.dedent(
    """
    import ctypes, os, sys
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MemoryDenyWriteExecute is Linux-only")
def test_python_runs_with_memory_deny_write_execute() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PARENT, _MDWE_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'codecs'}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    if result.returncode == 77:
        pytest.skip("kernel without prctl(PR_SET_MDWE) (Linux < 6.3)")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
