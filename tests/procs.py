"""Running ``fleetgate run`` / ``gateway`` / ``relay`` as real child processes for process-level tests.

Every listener, the relay's WebSocket and REST ports included, is on a free loopback port: a child
never binds the production defaults (8080, 8000) or a public address.
"""

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
        self.ports = {name: free_port() for name in ("gt06", "teltonika", "metrics", "ws", "rest")}
        self.env = {
            **os.environ,
            "FLEETGATE_LISTENERS__HOST": "127.0.0.1",
            "FLEETGATE_LISTENERS__GT06_PORT": str(self.ports["gt06"]),
            "FLEETGATE_LISTENERS__TELTONIKA_PORT": str(self.ports["teltonika"]),
            "FLEETGATE_LISTENERS__TELTONIKA_UDP_PORT": str(self.ports["teltonika"]),
            "FLEETGATE_METRICS__PORT": str(self.ports["metrics"]),
            "FLEETGATE_RELAY__HOST": "127.0.0.1",
            "FLEETGATE_RELAY__WS_PORT": str(self.ports["ws"]),
            "FLEETGATE_RELAY__REST_PORT": str(self.ports["rest"]),
            "FLEETGATE_STATE__SQLITE_PATH": str(workdir / "state.sqlite"),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{command}.log"

    def start(self) -> GatewayProcess:
        out = open(self.log, "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen([FLEETGATE, self.command], cwd=self.workdir, env=self.env, stdout=out, stderr=out)
        # `relay` opens only the relay's ports; the others open their metrics port last, once all is started.
        for name in ("ws", "rest") if self.command == "relay" else ("teltonika", "metrics"):
            self._wait_listening(name, timeout=20)
        return self

    def _wait_listening(self, name: str, timeout: float) -> None:
        """Wait for the child to listen on port ``name``; fail at once (with its log) if it exits instead."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_port(self.ports[name], timeout=0.25)
                return
            except TimeoutError:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    status = self.proc.returncode
                    raise RuntimeError(f"fleetgate {self.command} exited ({status}):\n{self.output()}") from None
                if time.monotonic() > deadline:
                    raise

    @property
    def ws_url(self) -> str:
        """The native protocol's WebSocket URL of this child's relay (``run``, ``gateway`` or ``relay``)."""
        return f"ws://127.0.0.1:{self.ports['ws']}/ws"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['rest']}"

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
