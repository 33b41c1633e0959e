"""Shared test data: the fixture corpus under fixtures/<protocol>/<case>.{hex,json}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
DEFAULT_NOW = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class Fixture:
    protocol: str
    name: str
    data: bytes
    expected: dict[str, Any]
    now: datetime
    crc_policy: str

    @property
    def id(self) -> str:
        return f"{self.protocol}/{self.name}"


def load_fixtures() -> list[Fixture]:
    out = []
    for js in sorted(FIXTURES.glob("*/*.json")):
        expected = json.loads(js.read_text())
        now = datetime.fromisoformat(expected.pop("now", DEFAULT_NOW).replace("Z", "+00:00"))
        crc_policy = expected.pop("crc_policy", "reject")
        data = bytes.fromhex("".join(js.with_suffix(".hex").read_text().split()))
        out.append(Fixture(js.parent.name, js.stem, data, expected, now, crc_policy))
    return out


FIXTURE_CASES = load_fixtures()


# --------------------------------------------------------------------------
# Private servers, one per test session (see tests/servers.py).

import pytest  # noqa: E402
from servers import Server, mosquitto, redis_server  # noqa: E402


@pytest.fixture(scope="session")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> object:
    server = redis_server(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto_srv(tmp_path_factory: pytest.TempPathFactory) -> object:
    server = mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_srv: Server) -> str:
    """A Redis URL on the private server, a fresh database number per test (flushed first)."""
    import redis as redis_sync

    client = redis_sync.Redis(port=redis_srv.port)
    client.flushall()
    client.close()
    return f"redis://127.0.0.1:{redis_srv.port}/0"
