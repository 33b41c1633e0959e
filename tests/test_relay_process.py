"""The relay as real processes: two ``fleetgate relay`` on one Redis beside a ``fleetgate gateway``, and the
embedded ``fleetgate run`` walk-through (run, token, simulate, watch), with real websockets clients."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from procs import FLEETGATE, GatewayProcess
from relaykit import SECRET, Client, driver, office, token

from gateway.bus.redis import TAIL_BLOCK_MS

pytestmark = pytest.mark.asyncio

COMPANY = "default"  # where the gateway puts devices it registers on their first login
QUIET_S = TAIL_BLOCK_MS / 1000 + 0.5  # longer than one blocking read of the Redis stream


class Watcher:
    """An office subscribed to ``all``, reading in its own task: every location it receives, in order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.locations: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, url: str, user: str) -> Watcher:
        client = await office(url, COMPANY, user)
        await client.send({"action": "subscribe", "all": True})
        assert await client.recv() == {"type": "subscribed", "all": True}
        watcher = cls(client)
        watcher._task = asyncio.create_task(watcher._read())
        return watcher

    async def _read(self) -> None:
        while True:
            message = await self.client.recv(timeout=60)
            if message["type"] == "location":
                self.locations.append(message)

    def records(self, predicate: Callable[[dict[str, Any]], bool] = lambda m: True) -> set[tuple[str, str]]:
        return {(m["driver_id"], m["timestamp"]) for m in self.locations if predicate(m)}

    async def stop_reading(self) -> None:
        """Stop the reading task (cancelling a websockets ``recv`` loses nothing), so the test can talk."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def until(
    predicate: Callable[[], bool], timeout: float, what: str, state: Callable[[], object] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} {state()}")
        await asyncio.sleep(0.02)


async def simulate(gw: GatewayProcess, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [FLEETGATE, "simulate", "--protocol", "teltonika", "--port", str(gw.ports["teltonika"]), *args]
    return await asyncio.to_thread(
        subprocess.run, argv, cwd=cwd, env=gw.env, capture_output=True, text=True, timeout=60
    )


@contextlib.asynccontextmanager
async def started(*processes: GatewayProcess) -> AsyncIterator[None]:
    """Start the processes concurrently; kill every one of them on the way out."""
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        yield
    finally:
        for p in processes:
            p.stop()


async def healthz(process: GatewayProcess) -> tuple[int, str]:
    async with httpx.AsyncClient(base_url=process.rest_url, timeout=5.0) as http:
        response = await http.get("/healthz")
    return response.status_code, response.json().get("status", "")


def distributed_env(redis_url: str) -> dict[str, str]:
    return {
        "FLEETGATE_BUS__DRIVER": "redis",
        "FLEETGATE_BUS__REDIS_URL": redis_url,
        "FLEETGATE_STATE__DRIVER": "redis",
        "FLEETGATE_STATE__REDIS_URL": redis_url,
        "FLEETGATE_AUTH__SECRET": SECRET,
        "FLEETGATE_LOG_LEVEL": "warning",
    }


async def test_two_relay_processes_on_one_redis(tmp_path: Path, redis_url: str) -> None:
    """Both relays stream the gateway's records; a driver on A reaches an office on B; a revocation through
    A's admin API closes B's socket within 1 s (promise 13, "on every relay instance")."""
    env = distributed_env(redis_url)
    for name in ("gateway", "relay-a", "relay-b"):
        (tmp_path / name).mkdir()
    gateway = GatewayProcess(
        tmp_path / "gateway", "gateway", FLEETGATE_REGISTRY__UNKNOWN_DEVICES="register",
        FLEETGATE_RELAY__ENABLED="false", **env,
    )  # fmt: skip
    relay_a = GatewayProcess(tmp_path / "relay-a", "relay", **env)
    relay_b = GatewayProcess(tmp_path / "relay-b", "relay", **env)
    async with started(gateway, relay_a, relay_b):
        on_a = await Watcher.start(relay_a.ws_url, "office-a")
        on_b = await Watcher.start(relay_b.ws_url, "office-b")
        # Fleets go quiet (nights, weekends): a relay must keep streaming after a while with no record.
        await asyncio.sleep(QUIET_S)
        for relay in (relay_a, relay_b):
            assert await healthz(relay) == (200, "ok")

        # 1. Simulated trackers -> gateway -> Redis -> both relays, every record on each.
        sim = await simulate(gateway, "--devices", "3", "--records", "30", "--interval", "0.1",
                             "--records-per-packet", "1", "--ack-timeout", "2")  # fmt: skip
        assert sim.returncode == 0, sim.stdout + sim.stderr
        assert "30 ACKed" in sim.stdout, sim.stdout
        await until(
            lambda: len(on_a.records()) >= 30 and len(on_b.records()) >= 30, 10.0, "30 records at each relay",
            lambda: (sorted(on_a.records()), sorted(on_b.records()), sim.stdout),
        )  # fmt: skip
        assert on_a.records() == on_b.records()
        assert len(on_a.records()) == 30 and len({d for d, _ in on_a.records()}) == 3
        assert len(on_a.locations) == len(on_b.locations) == 30  # no duplicates either

        # 2. A driver on relay A, an office on relay B.
        phone = await driver(relay_a.ws_url, COMPANY, "driver-7", name="Dana")
        await phone.send({"action": "location", "lat": 52.52, "lng": 13.405, "speed": 30.0})
        assert (await phone.recv())["type"] == "accepted"
        from_driver = lambda m: m["driver_id"] == "driver-7"  # noqa: E731
        await until(lambda: bool(on_b.records(from_driver)), 5.0, "the driver's location on relay B")
        seen = next(m for m in on_b.locations if from_driver(m))
        assert (seen["lat"], seen["lng"], seen["display_name"], seen["source"]) == (52.52, 13.405, "Dana", "driver")
        await until(lambda: bool(on_a.records(from_driver)), 5.0, "the driver's location on relay A")

        # 3. Revoke a token through relay A's REST API: its socket on relay B closes within 1 s.
        raw = token("office", COMPANY, "office-revoked")
        claims = jwt.decode(raw, options={"verify_signature": False})
        victim = await Client.connect(relay_b.ws_url)
        await victim.send({"action": "auth", "user_id": "office-revoked", "role": "office", "token": raw})
        assert (await victim.recv())["type"] == "authenticated"
        admin = token("admin", "*", "operator")
        async with httpx.AsyncClient(base_url=relay_a.rest_url, timeout=5.0) as http:
            started_at = time.monotonic()
            response = await http.post(
                "/api/admin/revocations",
                json={"jti": claims["jti"], "exp": claims["exp"]},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert response.status_code == 202, response.text
            error = await victim.recv(timeout=1.0)
            assert (error["type"], error["error"]) == ("error", "Unauthorized"), error
            assert await victim.closed_with(timeout=1.0) == 4001
            assert time.monotonic() - started_at < 1.0
        # The revoked token is refused on relay A too; the other sockets stay open.
        again = await Client.connect(relay_a.ws_url)
        await again.send({"action": "auth", "user_id": "office-revoked", "role": "office", "token": raw})
        assert (await again.recv())["error"] == "Unauthorized"
        for watcher in (on_a, on_b):
            await watcher.stop_reading()
            await watcher.client.send({"action": "ping"})
            assert await watcher.client.recv() == {"type": "pong"}


async def test_fleetgate_run_end_to_end(tmp_path: Path) -> None:
    """The walk-through: `fleetgate run`, a token from `fleetgate token`, `fleetgate simulate --register`,
    and an office on the printed WebSocket URL watching the simulated trackers move."""
    run = GatewayProcess(tmp_path, "run", FLEETGATE_LOG_LEVEL="warning")
    async with started(run):
        await until(lambda: "fleetgate token" in run.output(), 5.0, "the announcement")  # printed once ready
        out = run.output()
        ws_url = f"ws://127.0.0.1:{run.ports['ws']}/ws"
        assert f"websocket      {ws_url}" in out, out
        assert "fleetgate token --role office" in out, out
        # Same working directory and environment as `run`: the same secret file signs the token.
        minted = await asyncio.to_thread(
            subprocess.run, [FLEETGATE, "token", "--role", "office", "--company", "acme", "--user", "o1"],
            cwd=tmp_path, env=run.env, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert minted.returncode == 0, minted.stderr
        office_token = minted.stdout.strip()
        assert len(minted.stdout.splitlines()) == 1 and office_token.count(".") == 2

        client = await Client.connect(ws_url)
        await client.send({"action": "auth", "user_id": "o1", "role": "office", "token": office_token})
        assert (await client.recv())["type"] == "authenticated"
        await client.send({"action": "subscribe", "all": True})
        assert await client.recv() == {"type": "subscribed", "all": True}

        sim = asyncio.create_task(
            simulate(run, "--devices", "3", "--records", "15", "--interval", "0.2", "--records-per-packet", "1",
                     "--register", "--company", "acme", cwd=tmp_path)
        )  # fmt: skip
        positions: dict[str, set[tuple[float, float]]] = {}
        assets = {"sim-1", "sim-2", "sim-3"}
        try:
            async with asyncio.timeout(30):
                while set(positions) != assets or max(len(p) for p in positions.values()) < 2:
                    message = await client.recv(timeout=30)
                    assert message["type"] == "location", message
                    positions.setdefault(message["driver_id"], set()).add((message["lat"], message["lng"]))
        finally:
            result = await sim
        assert result.returncode == 0, result.stdout + result.stderr
        assert set(positions) == assets
