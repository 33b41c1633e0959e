"""Private redis-server and mosquitto instances for tests: free loopback port, own directory, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass
class Server:
    """A child server process; ``stop`` sends SIGTERM (or ``kill`` SIGKILL) to its PID and waits."""

    name: str
    port: int
    directory: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Server:
        log = open(self.directory / f"{self.name}.log", "ab")  # noqa: SIM115 (owned by the process)
        self.proc = subprocess.Popen(self.argv, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def redis_server(directory: Path, *, appendonly: bool = True, port: int | None = None) -> Server:
    """A redis-server on a free loopback port; with ``appendonly`` every write is fsynced to the AOF."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (make test installs it: apt-get install redis-server)")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
            "--daemonize", "no", "--protected-mode", "yes"]  # fmt: skip
    if appendonly:
        argv += ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        argv += ["--appendonly", "no"]
    return Server("redis", port, directory, argv)


def mosquitto(directory: Path, *, port: int | None = None) -> Server:
    """A mosquitto broker on a free loopback port, persistence on, no per-client queue limit."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto is not installed (make test installs it: apt-get install mosquitto)")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {directory}/\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"
        "log_dest stdout\n"
    )
    return Server("mosquitto", port, directory, [exe, "-c", str(conf)])
