"""Running ``fleetgate run`` / ``fleetgate gateway`` as real child processes for process-level tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from servers import free_port, wait_port

FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))


class GatewayProcess:
    """A ``fleetgate`` child on free loopback ports, configured through FLEETGATE_* variables."""

    def __init__(self, workdir: Path, command: str = "run", **env: str) -> None:
        self.workdir = workdir
        self.command = command
        self.ports = {"gt06": free_port(), "teltonika": free_port(), "metrics": free_port()}
        self.env = {
            **os.environ,
            "FLEETGATE_LISTENERS__HOST": "127.0.0.1",
            "FLEETGATE_LISTENERS__GT06_PORT": str(self.ports["gt06"]),
            "FLEETGATE_LISTENERS__TELTONIKA_PORT": str(self.ports["teltonika"]),
            "FLEETGATE_LISTENERS__TELTONIKA_UDP_PORT": str(self.ports["teltonika"]),
            "FLEETGATE_METRICS__PORT": str(self.ports["metrics"]),
            "FLEETGATE_STATE__SQLITE_PATH": str(workdir / "state.sqlite"),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{command}.log"

    def start(self) -> GatewayProcess:
        out = open(self.log, "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen([FLEETGATE, self.command], cwd=self.workdir, env=self.env, stdout=out, stderr=out)
        wait_port(self.ports["teltonika"], timeout=20)
        wait_port(self.ports["metrics"], timeout=20)
        return self

    def restart(self) -> GatewayProcess:
        """Start the command again on the same ports (after a kill or a stop)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("still running")
        return self.start()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
