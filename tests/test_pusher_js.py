"""Interop with the real JavaScript clients: pusher-js 8, Laravel Echo 2 and the npm ``pusher`` server library.

``fleetgate run`` runs as a child process; ``fleetgate simulate --register --company acme`` feeds it
Teltonika trackers, so every ``location.updated`` here went device -> gateway -> bus -> relay ->
pusher-js. The Node scripts in ``tests/js`` print one JSON line per thing they see; the exact
package versions come from ``tests/js/package-lock.json`` (``make js-deps``, or the first test here,
runs ``npm ci``). Every Node process is bounded by its own timeout and by the waits here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pusher
import pytest
from procs import FLEETGATE, GatewayProcess, wait_for

from relay.pusher_auth import app_secret
from relay.settings import AuthSettings, PusherAppSettings
from relay.tokens import mint_token

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"
JS_STAMP = JS / "node_modules" / ".installed"
DOCS = ROOT / "docs" / "pusher.md"
SECRET = "pusher-js-interop-secret-of-at-least-32-bytes"
AUTH = AuthSettings(secret=SECRET)
APP_SECRET = app_secret(PusherAppSettings(), SECRET)  # the default app's secret, derived from [auth] secret
NODE_TIMEOUT_MS = 25_000
WAIT_S = 15.0

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="node is not installed (scripts/system-deps.sh test installs nodejs and npm)"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The locked client packages, installed by ``npm ci`` when missing or older than the lock file."""
    lock = JS / "package-lock.json"
    if not JS_STAMP.exists() or JS_STAMP.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        assert npm is not None, "npm is missing (scripts/system-deps.sh test installs it)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
        JS_STAMP.touch()
    return JS / "node_modules"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, node_modules: Path) -> Iterator[GatewayProcess]:
    """``fleetgate run`` with two simulated acme trackers reporting every second, and one globex asset."""
    workdir = tmp_path_factory.mktemp("fleet")
    run = GatewayProcess(workdir, "run", FLEETGATE_AUTH__SECRET=SECRET).start()
    simulate = subprocess.Popen(
        [FLEETGATE, "simulate", "--register", "--company", "acme", "--devices", "2", "--interval", "1",
         "--records-per-packet", "1", "--port", str(run.ports["teltonika"]), "--duration", "300"],
        cwd=workdir, env=run.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        admin = {"Authorization": "Bearer " + token(role="admin", company="*", user="root")}
        reply = httpx.put(f"{run.rest_url}/api/admin/devices/490154203237518", headers=admin, timeout=5,
                          json={"asset_id": "gx-truck", "company_id": "globex"})  # fmt: skip
        assert reply.status_code == 201, reply.text
        # `simulate --register` writes the registry before its trackers connect; channel rules read it.
        acme = f"{run.rest_url}/api/admin/devices?company=acme"
        registered = wait_for(lambda: len(httpx.get(acme, headers=admin, timeout=5).json()["devices"]) == 2, 20)
        assert registered, run.output()
        yield run
    finally:
        simulate.kill()
        simulate.wait(10)
        run.stop()


def token(role: str = "office", company: str = "acme", user: str = "office-1", **extra: Any) -> str:
    return mint_token(AUTH, role=role, company=company, user=user, ttl_s=600, **extra)


class Node:
    """A Node script as a child process: JSON lines out, commands in."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.seen: list[str] = []

    @classmethod
    async def start(cls, script: Path, env: dict[str, str], *args: str) -> Node:
        env = {**os.environ, "TIMEOUT_MS": str(NODE_TIMEOUT_MS), **env}
        proc = await asyncio.create_subprocess_exec(
            "node", str(script), *args, cwd=script.parent, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return cls(proc, script.name)

    async def next(self, match: Callable[[dict[str, Any]], bool], timeout: float = WAIT_S) -> dict[str, Any]:
        """The next JSON line for which ``match`` holds (other lines are kept for the failure message)."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        raise AssertionError(f"{self.name} exited ({await self.proc.wait()})")
                    line = raw.decode(errors="replace").rstrip()
                    self.seen.append(line)
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if isinstance(message, dict) and match(message):
                            return message
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{self.name}: no matching line; saw:\n" + "\n".join(self.seen[-30:])) from exc

    async def line(self, pattern: str, timeout: float = WAIT_S) -> str:
        """The next output line (JSON or not) matching the regular expression ``pattern``."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        raise AssertionError(f"{self.name} exited ({await self.proc.wait()})")
                    line = raw.decode(errors="replace").rstrip()
                    self.seen.append(line)
                    if re.search(pattern, line):
                        return line
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{self.name}: no line like {pattern!r}; saw:\n" + "\n".join(self.seen[-30:])) from exc

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                await self.send("quit")
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@contextlib.asynccontextmanager
async def node(script: str, fleet: GatewayProcess, *args: str, **env: str) -> AsyncIterator[Node]:
    base = {
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(fleet.ports["ws"]),
        "AUTH_ENDPOINT": f"{fleet.rest_url}/broadcasting/auth",
        "HOST": "127.0.0.1",
        "PORT": str(fleet.ports["rest"]),
        "SECRET": APP_SECRET,
    }
    client = await Node.start(JS / script, {**base, **env}, *args)
    try:
        yield client
    finally:
        await client.stop()


def of_type(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())


def updates(data: Any) -> list[dict[str, Any]]:
    """``location.updated`` data: one update, or an array of them when records were batched."""
    return data if isinstance(data, list) else [data]


# -- pusher-js ---------------------------------------------------------------------------------------------------


async def test_pusher_js_receives_simulated_locations_after_a_refused_channel(fleet: GatewayProcess) -> None:
    channels = "private-account.globex,private-asset.gx-truck,private-account.acme,private-asset.sim-1"
    async with node("listen.mjs", fleet, CHANNELS=channels, TOKEN=token()) as client:
        for refused in ("private-account.globex", "private-asset.gx-truck"):
            error = await client.next(of_type("subscription_error", channel=refused))
            assert error["status"] == 403
            assert error["state"] == "connected"  # the socket stays open
        await client.next(of_type("subscribed", channel="private-account.acme"))
        await client.next(of_type("subscribed", channel="private-asset.sim-1"))
        account = await client.next(of_type("event", channel="private-account.acme", event="location.updated"))
        for update in updates(account["data"]):
            assert update["companyId"] == "acme"
            assert update["assetId"] in ("sim-1", "sim-2")
            assert {"lat", "lng", "speed", "heading", "timestamp", "receivedAt", "imei"} <= set(update)
        asset = await client.next(of_type("event", channel="private-asset.sim-1", event="location.updated"))
        assert {u["assetId"] for u in updates(asset["data"])} == {"sim-1"}


async def test_another_companys_asset_channel_is_refused(fleet: GatewayProcess) -> None:
    channels = "private-asset.sim-1,private-account.acme,private-account.globex"
    async with node("listen.mjs", fleet, CHANNELS=channels, TOKEN=token(company="globex", user="g-1")) as client:
        for refused in ("private-asset.sim-1", "private-account.acme"):
            assert (await client.next(of_type("subscription_error", channel=refused)))["status"] == 403
        await client.next(of_type("subscribed", channel="private-account.globex"))


async def test_presence_members_appear_and_leave(fleet: GatewayProcess) -> None:
    channel = "presence-account.acme"
    async with node("listen.mjs", fleet, CHANNELS=channel, TOKEN=token(user="ann", name="Ann")) as ann:
        joined = await ann.next(of_type("subscribed", channel=channel))
        assert joined["members"] == [{"id": "ann", "info": {"name": "Ann", "role": "office"}}]
        async with node("listen.mjs", fleet, CHANNELS=channel, TOKEN=token(user="bob", name="Bob")) as bob:
            members = (await bob.next(of_type("subscribed", channel=channel)))["members"]
            assert sorted(m["id"] for m in members) == ["ann", "bob"]
            added = await ann.next(of_type("member_added", channel=channel))
            assert added["id"] == "bob"
            assert added["info"] == {"name": "Bob", "role": "office"}
        removed = await ann.next(of_type("member_removed", channel=channel))
        assert removed["id"] == "bob"


# -- Laravel Echo -----------------------------------------------------------------------------------------------


async def test_laravel_echo_listens_with_a_leading_dot(fleet: GatewayProcess) -> None:
    env = {"TOKEN": token(), "LISTEN": ".location.updated"}
    async with (
        node("echo.mjs", fleet, PRIVATE="account.acme", **env) as echo,
        node("echo.mjs", fleet, PRIVATE="account.globex", **env) as refused,
    ):
        await echo.next(of_type("subscribed", channel="private-account.acme"))
        event = await echo.next(of_type("event", event=".location.updated"))
        assert {u["companyId"] for u in updates(event["data"])} == {"acme"}
        error = await refused.next(of_type("subscription_error"))  # Echo's .error() fired
        assert error["status"] == 403


# -- server libraries publishing through the HTTP API -------------------------------------------------------------


async def test_pypi_pusher_triggers_an_event_pusher_js_receives(fleet: GatewayProcess) -> None:
    def lib(secret: str) -> pusher.Pusher:
        return pusher.Pusher(app_id="1", key="fleetgate", secret=secret, host="127.0.0.1", port=fleet.ports["rest"],
                             ssl=False, timeout=5)  # fmt: skip

    async with node("listen.mjs", fleet, CHANNELS="private-account.acme", EVENTS="fleet.notice", TOKEN=token()) as js:
        await js.next(of_type("subscribed", channel="private-account.acme"))
        reply = await asyncio.to_thread(lib(APP_SECRET).trigger, "private-account.acme", "fleet.notice", {"n": 1})
        assert reply == {}
        event = await js.next(of_type("event", event="fleet.notice"))
        assert event["data"] == {"n": 1}
        with pytest.raises(pusher.errors.PusherBadAuth):
            await asyncio.to_thread(lib("a-wrong-secret").trigger, "private-account.acme", "fleet.notice", {"n": 2})
        info = await asyncio.to_thread(lib(APP_SECRET).channel_info, "private-account.acme", ["subscription_count"])
        assert info["occupied"] is True and info["subscription_count"] >= 1


async def test_npm_pusher_triggers_an_event_pusher_js_receives(fleet: GatewayProcess) -> None:
    async with node("listen.mjs", fleet, CHANNELS="private-account.acme", EVENTS="fleet.notice", TOKEN=token()) as js:
        await js.next(of_type("subscribed", channel="private-account.acme"))
        async with node("trigger.mjs", fleet, "private-account.acme", "fleet.notice", '{"from":"node"}') as lib:
            assert (await lib.next(of_type("triggered")))["status"] == 200
        assert (await js.next(of_type("event", event="fleet.notice")))["data"] == {"from": "node"}
        async with node("trigger.mjs", fleet, "private-account.acme", "fleet.notice", "{}", SECRET="wrong") as bad:
            assert (await bad.next(of_type("error")))["status"] == 401


# -- the examples of docs/pusher.md, as written ---------------------------------------------------------------------


def doc_example(first_line: str) -> str:
    """The fenced code block of docs/pusher.md whose first line is ``first_line``."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", DOCS.read_text(), flags=re.S):
        if block.startswith(first_line + "\n"):
            return str(block)
    raise AssertionError(f"docs/pusher.md has no code block starting with {first_line!r}")


def for_this_fleet(code: str, fleet: GatewayProcess) -> str:
    """The example with this test's ports and company in place of the defaults (8080, 8000, simulated)."""
    code = code.replace("wsPort: 8080", f"wsPort: {fleet.ports['ws']}")
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{fleet.ports['rest']}")
    return code.replace(".simulated", ".acme")


@pytest.mark.parametrize("example", ["// watch.mjs", "// echo-watch.mjs"])
async def test_the_docs_examples_work_as_written(fleet: GatewayProcess, tmp_path: Path, example: str) -> None:
    script = tmp_path / example.removeprefix("// ")
    script.write_text(for_this_fleet(doc_example(example), fleet))
    (tmp_path / "node_modules").symlink_to(JS / "node_modules")  # what `npm install pusher-js laravel-echo` gives
    minted = subprocess.run(
        [FLEETGATE, "token", "--role", "office", "--company", "acme", "--user", "office-1", "--ttl", "8h"],
        cwd=tmp_path, env=fleet.env, capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    client = await Node.start(script, {"FLEETGATE_TOKEN": minted.stdout.strip()})
    try:
        await client.line(r"^sim-[12] ")
    finally:
        client.proc.kill()
        await client.proc.wait()


def test_the_lock_file_pins_the_versions_the_issue_names() -> None:
    lock = json.loads((JS / "package-lock.json").read_text())
    packages = lock["packages"]
    assert {name: packages[f"node_modules/{name}"]["version"] for name in ("pusher-js", "laravel-echo", "pusher")} == {
        "pusher-js": "8.6.0", "laravel-echo": "2.5.0", "pusher": "5.3.4"}  # fmt: skip
