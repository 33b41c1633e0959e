"""soketi (a Pusher-compatible server on Node and uWebSockets.js) as a local peer of ``bench/fanout.py``.

``bench/soketi/package.json`` pins it; ``npm install @soketi/soketi`` alone fails (its
uWebSockets.js dependency is a git URL), so the package overrides that dependency with
``@trufflesuite/uws-js-unofficial`` from the npm registry (pusher.md section 12). ``npm ci`` runs
there on first use. soketi reads ``SOKETI_*`` variables (``dist/cli/cli.js``) and a JSON file of
dotted option paths (``--config``), the only way to bind its UDP discovery (node-discover's
``cluster.address``) to loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import ClassVar

from bench.wsclient import die_with_parent, process_tree, progress, read_response

SOKETI_DIR = Path(__file__).resolve().parent / "soketi"
SOKETI_SERVER_JS = SOKETI_DIR / "node_modules" / "@soketi" / "soketi" / "bin" / "server.js"
# Written after a complete `npm ci` (an interrupted one leaves a partial node_modules behind).
SOKETI_STAMP = SOKETI_DIR / "node_modules" / ".fleetgate-installed"
NPM_CI_TIMEOUT_S = 240.0
SOKETI_START_TIMEOUT_S = 30.0


class SoketiPeer:
    """soketi from ``bench/soketi`` (``npm ci`` there when missing), bound to 127.0.0.1 on free ports with
    one app (``id``, ``key``, ``secret``); its metrics server and UDP discovery on loopback too. Stopped by
    its PID (``live``: what is still running, for the benchmark's last-resort clean-up)."""

    live: ClassVar[list[tuple[asyncio.subprocess.Process, bool]]] = []  # (process, own process group)

    def __init__(self, work: Path, app_id: str, key: str, secret: str) -> None:
        self.work = work / "soketi"
        self.app = {"DEFAULT_APP_ID": app_id, "DEFAULT_APP_KEY": key, "DEFAULT_APP_SECRET": secret}
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.versions: dict[str, str] = {}

    async def install(self) -> str | None:
        """None when soketi can run, else why it cannot."""
        node = shutil.which("node")
        if node is None:
            return "node is not on PATH"
        self.node = node
        if not installed():
            npm = shutil.which("npm")
            if npm is None:
                return "npm is not on PATH (needed once: npm ci in bench/soketi)"
            progress("soketi: npm ci in bench/soketi (first run)")
            problem = await self._npm_ci(npm)
            if problem is not None:
                return problem
        self.versions = {"node": await self._output(node, "--version")}
        for name, package in (("soketi", "@soketi/soketi"), ("uWebSockets.js", "uWebSockets.js")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                meta = json.loads((SOKETI_DIR / "node_modules" / package / "package.json").read_text())
                self.versions[name] = f"{meta['name']}@{meta['version']}"
        return None

    async def _npm_ci(self, npm: str) -> str | None:
        proc = await asyncio.create_subprocess_exec(
            npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=SOKETI_DIR,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        entry = (proc, True)
        self.live.append(entry)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), NPM_CI_TIMEOUT_S)
        except TimeoutError:
            return f"npm ci in bench/soketi took longer than {NPM_CI_TIMEOUT_S:.0f} s"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # npm and whatever it started, nothing else
                await proc.wait()
            self.live.remove(entry)
        if proc.returncode != 0:
            tail = output.decode(errors="replace").strip().splitlines()[-5:]
            return f"npm ci in bench/soketi failed (exit {proc.returncode}): {' | '.join(tail)}"
        if not SOKETI_SERVER_JS.exists():
            return "npm ci in bench/soketi did not install @soketi/soketi"
        SOKETI_STAMP.touch()
        return None

    @staticmethod
    async def _output(*argv: str) -> str:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 10.0)
        return out.decode().strip()

    def _environment(self, port: int) -> dict[str, str]:
        """soketi reads SOKETI_* (cli.ts); nothing else from ours leaks in (a stray SOKETI_* would)."""
        settings = {
            "HOST": "127.0.0.1", "PORT": port, "DEBUG": "false",
            "METRICS_ENABLED": "false", "METRICS_HOST": "127.0.0.1", "METRICS_SERVER_PORT": free_port(),
            # node-discover: bound to cluster.address (config file, no variable), hellos to loopback only
            "CLUSTER_PORT": free_port(socket.SOCK_DGRAM), "CLUSTER_UNICAST_ADDRESSES": "127.0.0.1",
            **self.app, "DEFAULT_APP_MAX_CONNS": -1, "DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SEC": -1,
            "SHUTDOWN_GRACE_PERIOD": 0,
        }  # fmt: skip
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work)}
        env.update({f"SOKETI_{name}": str(value) for name, value in settings.items()})
        return env

    async def start(self) -> None:
        """Start soketi and wait until ``GET /`` answers; RuntimeError (with its log's tail) if it does not."""
        self.work.mkdir(exist_ok=True)
        config = self.work / "config.json"
        config.write_text(json.dumps({"cluster.address": "127.0.0.1", "cluster.hostname": "127.0.0.1"}))
        self.port = free_port()
        log = self.work / "soketi.log"
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                self.node, str(SOKETI_SERVER_JS), "start", f"--config={config}", cwd=self.work,
                env=self._environment(self.port), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        self.live.append((self.proc, False))
        deadline = time.monotonic() + SOKETI_START_TIMEOUT_S
        while True:
            if self.proc.returncode is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"soketi exited ({self.proc.returncode}): {' | '.join(tail)}")
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                if await asyncio.wait_for(http_get(self.port, "/"), 2.0) == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"soketi did not answer on 127.0.0.1:{self.port} in {SOKETI_START_TIMEOUT_S} s")
            await asyncio.sleep(0.1)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            except asyncio.CancelledError:
                proc.kill()
                raise
        self.live[:] = [entry for entry in self.live if entry[0] is not proc]


def installed() -> bool:
    """``npm ci`` completed in ``bench/soketi`` since its package files last changed."""
    try:
        stamp = SOKETI_STAMP.stat().st_mtime
        return all(stamp >= (SOKETI_DIR / name).stat().st_mtime for name in ("package.json", "package-lock.json"))
    except OSError:
        return False


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port free right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def http_get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status, _, _ = await read_response(reader)
        return status
    finally:
        writer.close()
