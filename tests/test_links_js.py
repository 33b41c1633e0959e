"""Tracking links end to end with the real JavaScript client: pusher-js 8 watches a simulated vehicle.

``fleetgate run`` runs as a child process and ``fleetgate simulate --register --company acme`` feeds it
a Teltonika tracker (asset ``sim-1``) every second, so every ``location.updated`` here went device ->
gateway -> bus -> relay -> pusher-js. Links are made with the management API and opened with the
public flow (verify), as a web page would; ``tests/js/viewer.mjs`` is the viewer. The pusher-js example
of ``docs/tracking-links.md`` runs as written, with this test's ports.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import FLEETGATE, GatewayProcess, wait_for
from test_pusher_js import JS, JS_STAMP, Node, of_type

from relay.settings import AuthSettings
from relay.tokens import mint_token

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "tracking-links.md"
SECRET = "tracking-links-js-secret-of-at-least-32-bytes"
OFFICE = {"Authorization": "Bearer " + mint_token(AuthSettings(secret=SECRET), role="office", company="acme",
                                                  user="office-1", ttl_s=600)}  # fmt: skip
WAIT_S = 15.0

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="node is not installed (scripts/system-deps.sh test installs nodejs and npm)"
)


@dataclass
class Fleet:
    """The running processes, and a link whose polling tells where the vehicle is (no ids needed)."""

    run: GatewayProcess
    probe: tuple[str, str]  # link uuid, session token

    def position(self) -> dict[str, Any] | None:
        link, session = self.probe
        url = f"{self.run.rest_url}/api/public/tracking-links/{link}/location"
        reply = httpx.get(url, headers=_bearer(session), timeout=5)
        return dict(reply.json()) if reply.status_code == 200 else None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """``fleetgate run`` (tracking links on, the default) with one simulated acme tracker reporting every second."""
    if not JS_STAMP.exists():
        npm = shutil.which("npm")
        assert npm is not None, "npm is missing (scripts/system-deps.sh test installs it)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
        JS_STAMP.touch()
    workdir = tmp_path_factory.mktemp("links-fleet")
    run = GatewayProcess(workdir, "run", FLEETGATE_AUTH__SECRET=SECRET).start()
    simulate = subprocess.Popen(
        [FLEETGATE, "simulate", "--register", "--company", "acme", "--devices", "1", "--interval", "1",
         "--records-per-packet", "1", "--port", str(run.ports["teltonika"]), "--duration", "300"],
        cwd=workdir, env=run.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        probe = _create(run, display_name="probe")
        fleet = Fleet(run, (probe, _verify(run, probe)))
        assert wait_for(lambda: fleet.position() is not None, 20, interval=0.5), run.output()
        yield fleet
    finally:
        simulate.kill()
        simulate.wait(10)
        run.stop()


def _create(run: GatewayProcess, **fields: Any) -> str:
    body = {"asset_id": "sim-1", "display_name": "Your delivery", **fields}
    reply = httpx.post(f"{run.rest_url}/api/tracking-links", json=body, headers=OFFICE, timeout=5)
    assert reply.status_code == 201, reply.text
    return str(reply.json()["uuid"])


def _verify(run: GatewayProcess, link: str) -> str:
    reply = httpx.post(f"{run.rest_url}/api/public/tracking-links/{link}/verify", timeout=5)
    assert reply.status_code == 200, reply.text
    grant = reply.json()
    assert grant["channel"] == f"private-tracking-link.{link}" and grant["app_key"] == "fleetgate"
    assert grant["ws_url"] == f"ws://127.0.0.1:{run.ports['ws']}"
    return str(grant["session_token"])


def _bearer(session: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {session}"}


@contextlib.asynccontextmanager
async def viewer(fleet: Fleet, link: str, session: str) -> AsyncIterator[Node]:
    env = {
        "WS_PORT": str(fleet.run.ports["ws"]),
        "AUTH_ENDPOINT": f"{fleet.run.rest_url}/broadcasting/auth",
        "LINK": link,
        "SESSION_TOKEN": session,
        "TIMEOUT_MS": "25000",
    }
    client = await Node.start(JS / "viewer.mjs", env)
    try:
        yield client
    finally:
        await client.stop()


async def test_pusher_js_watches_a_simulated_vehicle_after_verifying(fleet: Fleet) -> None:
    link = _create(fleet.run)
    session = _verify(fleet.run, link)
    async with viewer(fleet, link, session) as js:
        await js.next(of_type("subscribed"))
        seen = [(await js.next(of_type("event", event="location.updated"), WAIT_S))["data"] for _ in range(2)]
        for update in seen:
            assert set(update) >= {"lat", "lng", "speed", "heading", "status", "display_name", "timestamp"}
            assert update["display_name"] == "Your delivery" and update["status"] in ("moving", "stopped")
            assert "distance_km" not in update and "eta_minutes" not in update
        assert seen[0]["timestamp"] < seen[1]["timestamp"]
        polled = httpx.get(f"{fleet.run.rest_url}/api/public/tracking-links/{link}/location", headers=_bearer(session))
        assert polled.status_code == 200 and set(polled.json()) == set(seen[1])
        # Disabled by the office: link.expired, then pusher:error 4004 and a close pusher-js does not retry.
        reply = httpx.patch(f"{fleet.run.rest_url}/api/tracking-links/{link}", json={"enabled": False}, headers=OFFICE)
        assert reply.status_code == 200, reply.text
        assert (await js.next(of_type("event", event="link.expired")))["data"] == {"reason": "disabled"}
        assert (await js.next(of_type("error")))["code"] == 4004
        await js.next(of_type("state", current="disconnected"))


async def test_a_session_of_another_link_is_refused_to_pusher_js(fleet: Fleet) -> None:
    mine, other = _create(fleet.run), _create(fleet.run)
    async with viewer(fleet, other, _verify(fleet.run, mine)) as js:
        error = await js.next(of_type("subscription_error"))
        assert error["status"] == 401  # pusher-js reports it on the channel; the connection stays up
        assert [line for line in js.seen if '"state"' in line][-1] == '{"type":"state","current":"connected"}'


async def test_reaching_the_destination_expires_the_link_for_pusher_js(fleet: Fleet) -> None:
    # Far away first: a link ends on arrival whether or not anyone watches, so the destination is moved
    # to the vehicle once pusher-js is subscribed.
    link = _create(fleet.run, arrival={"lat": 0.0, "lng": 0.0, "radius_m": 1000})
    async with viewer(fleet, link, _verify(fleet.run, link)) as js:
        await js.next(of_type("subscribed"))
        here = fleet.position()  # the vehicle moves at most ~25 m/s: within 1 km for a while
        assert here is not None
        destination = {"arrival": {"lat": here["lat"], "lng": here["lng"], "radius_m": 1000}}
        reply = httpx.patch(f"{fleet.run.rest_url}/api/tracking-links/{link}", json=destination, headers=OFFICE)
        assert reply.status_code == 200, reply.text
        expired = await js.next(of_type("event", event="link.expired"))  # at the next simulated record
        assert expired["data"] == {"reason": "arrival"}
        assert (await js.next(of_type("error")))["code"] == 4004
        await js.next(of_type("state", current="disconnected"))
        updates = [line for line in js.seen if '"location.updated"' in line]
        assert all('"distance_km"' in line for line in updates)
    stored = httpx.get(f"{fleet.run.rest_url}/api/tracking-links/{link}", headers=OFFICE).json()
    assert (stored["status"], stored["expired_reason"]) == ("expired", "arrival")


# -- the example of docs/tracking-links.md, as written --------------------------------------------------------


def doc_example(first_line: str) -> str:
    for block in re.findall(r"```[a-z]*\n(.*?)```", DOCS.read_text(), flags=re.S):
        if block.startswith(first_line + "\n"):
            return str(block)
    raise AssertionError(f"docs/tracking-links.md has no code block starting with {first_line!r}")


async def test_the_docs_viewer_example_works_as_written(fleet: Fleet, tmp_path: Path) -> None:
    code = doc_example("// link-viewer.mjs")
    code = code.replace("wsPort: 8080", f"wsPort: {fleet.run.ports['ws']}").replace(
        "127.0.0.1:8000", f"127.0.0.1:{fleet.run.ports['rest']}"
    )
    script = tmp_path / "link-viewer.mjs"
    script.write_text(code)
    (tmp_path / "node_modules").symlink_to(JS / "node_modules")  # what `npm install pusher-js` gives
    link = _create(fleet.run)
    client = await Node.start(script, {"LINK": link, "SESSION_TOKEN": _verify(fleet.run, link)})
    try:
        await client.line(r"^Your delivery: -?\d+\.\d+,-?\d+\.\d+ ")
    finally:
        client.proc.kill()
        await client.proc.wait()
