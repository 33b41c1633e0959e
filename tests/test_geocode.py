"""Reverse geocoding: the bundled town table, a loopback Nominatim stand-in, fallback and cache."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from servers import free_port

from relay.links.geocode import CachedGeocoder, NominatimGeocoder, PlaceTable, open_geocoder
from relay.links.model import distance_km

BERLIN = (52.5200, 13.4050)
NOTRE_DAME = (48.8530, 2.3499)
MID_ATLANTIC = (30.0, -40.0)

# -- the bundled town table ------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> PlaceTable:
    return PlaceTable()


@pytest.mark.parametrize(
    ("lat", "lng", "expected"),
    [
        (*BERLIN, "Berlin, Germany"),
        (52.4987, 13.4034, "Berlin, Germany"),  # Kreuzberg: a section of Berlin, not a town
        (*NOTRE_DAME, "Paris, France"),
        (52.3906, 13.0645, "Potsdam, Germany"),  # a town next to a city stays itself
        (40.7357, -74.1724, "Newark, United States"),
        (37.5665, 126.9780, "Seoul, South Korea"),  # readable country names, not "Korea, Republic of"
        (-33.8688, 151.2093, "Sydney, Australia"),
        (-18.1416, 178.4419, "Suva, Fiji"),
        (-18.1416, 178.4419 - 360, "Suva, Fiji"),  # longitudes wrap
        (64.1466, -21.9426, "Reykjavík, Iceland"),
    ],
)
def test_known_places(table: PlaceTable, lat: float, lng: float, expected: str) -> None:
    assert table.nearest(lat, lng) == expected


@pytest.mark.parametrize(
    ("lat", "lng"),
    [MID_ATLANTIC, (90.0, 0.0), (-90.0, 123.0), (0.0, -160.0), (91.0, 0.0), (math.nan, 0.0), (0.0, math.inf)],
)
def test_nowhere_near_a_town(table: PlaceTable, lat: float, lng: float) -> None:
    assert table.nearest(lat, lng) is None


async def test_address_is_the_async_face(table: PlaceTable) -> None:
    fresh = PlaceTable()  # loads (once per process, already done) off the event loop
    assert await fresh.address(*BERLIN) == "Berlin, Germany"
    assert await fresh.address(*MID_ATLANTIC) is None


def test_max_km(table: PlaceTable) -> None:
    with pytest.raises(ValueError):
        PlaceTable(max_km=0)
    lonely = (51.0, -40.0)  # open Atlantic, hundreds of km from land
    assert PlaceTable(max_km=1000).nearest(*lonely) is not None
    assert table.nearest(*lonely) is None


def _write_table(directory: Path, places: list[tuple[str, float, float]]) -> None:
    lines = "".join(f"{name}\tXX\t{lat:.4f}\t{lng:.4f}\n" for name, lat, lng in places)
    (directory / "places.tsv.gz").write_bytes(gzip.compress(lines.encode()))
    (directory / "countries.tsv").write_text("XX\tTestland\n")


def test_grid_search_equals_brute_force(tmp_path: Path) -> None:
    """The ring search finds what a full scan finds, at the date line and the poles too."""
    rng = random.Random(7)
    spots = [(rng.uniform(-90, 90), rng.uniform(-180, 180)) for _ in range(1500)]
    spots += [(rng.uniform(80, 90), rng.uniform(-180, 180)) for _ in range(300)]  # crowded around the pole
    spots += [(rng.uniform(-10, 10), rng.choice((-1, 1)) * rng.uniform(179, 180)) for _ in range(200)]
    places = [(f"P{i}", round(lat, 4), round(lng, 4)) for i, (lat, lng) in enumerate(spots)]
    _write_table(tmp_path, places)
    grid = PlaceTable(max_km=400, directory=tmp_path)
    probes = [(rng.uniform(-90, 90), rng.uniform(-180, 180)) for _ in range(200)]
    probes += [(rng.uniform(85, 90), rng.uniform(-180, 180)) for _ in range(50)]
    probes += [(rng.uniform(-10, 10), rng.choice((-1, 1)) * rng.uniform(179.5, 180)) for _ in range(50)]
    for lat, lng in probes:
        best = min(places, key=lambda p: distance_km(lat, lng, p[1], p[2]))
        expected = f"{best[0]}, Testland" if distance_km(lat, lng, best[1], best[2]) <= 400 else None
        assert grid.nearest(lat, lng) == expected, (lat, lng)


# -- a loopback Nominatim ----------------------------------------------------------------------

STREET = {
    "place_id": 1,
    "lat": "52.5170",
    "lon": "13.3889",
    "display_name": "12, Unter den Linden, Mitte, Berlin, 10117, Deutschland",
    "address": {"house_number": "12", "road": "Unter den Linden", "suburb": "Mitte", "city": "Berlin"},
}


@dataclass
class FakeNominatim:
    """An HTTP/1.1 server on a free loopback port: one answer for every request, each request recorded."""

    status: int = 200
    body: bytes = json.dumps(STREET).encode()
    delay_s: float = 0.0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/nominatim/"

    def answer(self, payload: object, status: int = 200) -> None:
        self.body, self.status = json.dumps(payload).encode(), status

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            target = head[0].split(" ")[1]
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            self.requests.append((target, headers))
            await asyncio.sleep(self.delay_s)
            head = f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + self.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def nominatim() -> AsyncIterator[FakeNominatim]:
    fake = FakeNominatim()
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await fake.handle(reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    yield fake
    server.close()
    for task in list(handlers):
        task.cancel()
    await server.wait_closed()


@pytest.fixture
async def street_level(nominatim: FakeNominatim) -> AsyncIterator[NominatimGeocoder]:
    geocoder = NominatimGeocoder(nominatim.url, user_agent="fleetgate-test/1.0", timeout_s=0.3, fallback=PlaceTable())
    yield geocoder
    await geocoder.aclose()


async def test_street_level_answer(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    assert await street_level.address(52.517037, 13.388860) == "Unter den Linden 12, Berlin"
    [(target, headers)] = nominatim.requests
    url = urlsplit(target)
    assert url.path == "/nominatim/reverse"
    query = {key: values[0] for key, values in parse_qs(url.query).items()}
    assert query == {"format": "jsonv2", "lat": "52.517037", "lon": "13.388860", "zoom": "18", "addressdetails": "1"}
    assert headers["user-agent"] == "fleetgate-test/1.0"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ({"road": "Rue de Rivoli", "city": "Paris"}, "Rue de Rivoli, Paris"),
        ({"road": "Dorfstraße", "house_number": "3a", "village": "Kleinmachnow"}, "Dorfstraße 3a, Kleinmachnow"),
        ({"road": "Hauptstraße", "house_number": "1", "town": "Teltow"}, "Hauptstraße 1, Teltow"),
        ({"road": "A 10"}, "A 10"),
    ],
)
async def test_street_formats(
    nominatim: FakeNominatim, street_level: NominatimGeocoder, address: dict[str, str], expected: str
) -> None:
    nominatim.answer({"place_id": 2, "address": address})
    assert await street_level.address(*BERLIN) == expected


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (200, {"error": "Unable to geocode"}),  # nothing there
        (200, {"place_id": 3, "address": {"city": "Berlin"}}),  # no road: the town table says as much
        (500, {"error": "internal"}),
        (503, "Service Unavailable"),
        (200, "<html>not json</html>"),
        (200, {"address": {"road": 12}}),  # wrong types
    ],
)
async def test_unusable_answers_fall_back_to_the_town(
    nominatim: FakeNominatim, street_level: NominatimGeocoder, status: int, payload: object
) -> None:
    nominatim.answer(payload, status)
    assert await street_level.address(*BERLIN) == "Berlin, Germany"
    assert len(nominatim.requests) == 1


async def test_timeout_falls_back(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    nominatim.delay_s = 2.0  # the geocoder gives up after 0.3 s
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await street_level.address(*NOTRE_DAME) == "Paris, France"
    assert loop.time() - started < 1.0


async def test_server_down_falls_back_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    geocoder = NominatimGeocoder(f"http://127.0.0.1:{free_port()}", user_agent="t", fallback=PlaceTable())
    try:
        with caplog.at_level(logging.WARNING, logger="relay.links.geocode"):
            assert await geocoder.address(*BERLIN) == "Berlin, Germany"
            assert await geocoder.address(*NOTRE_DAME) == "Paris, France"
            assert await geocoder.address(*MID_ATLANTIC) is None
        assert [r.message.split(" (")[0] for r in caplog.records] == [f"reverse geocoder {geocoder._base_url} failing"]
    finally:
        await geocoder.aclose()


async def test_recovery_is_logged(nominatim: FakeNominatim, caplog: pytest.LogCaptureFixture) -> None:
    geocoder = NominatimGeocoder(nominatim.url, user_agent="t")  # no fallback: None on failure
    try:
        with caplog.at_level(logging.WARNING, logger="relay.links.geocode"):
            nominatim.answer({}, 502)
            assert await geocoder.address(*BERLIN) is None
            nominatim.answer(STREET)
            assert await geocoder.address(*BERLIN) == "Unter den Linden 12, Berlin"
        assert ["failing" in r.message for r in caplog.records] == [True, False]
        assert "answers again" in caplog.records[1].message
    finally:
        await geocoder.aclose()


# -- the cache --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_hit_does_not_ask_again(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    cached = CachedGeocoder(street_level)
    assert await cached.address(52.517037, 13.388860) == "Unter den Linden 12, Berlin"
    assert await cached.address(52.517041, 13.388855) == "Unter den Linden 12, Berlin"  # same ~11 m cell
    assert len(nominatim.requests) == 1
    assert "lat=52.517000&lon=13.388900" in nominatim.requests[0][0]  # asked with the cell's coordinates
    await cached.address(52.5172, 13.3889)  # another cell
    assert len(nominatim.requests) == 2


async def test_cache_entries_expire(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    clock = FakeClock()
    cached = CachedGeocoder(street_level, ttl_s=60, clock=clock)
    assert await cached.address(*BERLIN) == "Unter den Linden 12, Berlin"
    clock.now += 59
    nominatim.answer({"address": {"road": "Neue Straße", "city": "Berlin"}})
    assert await cached.address(*BERLIN) == "Unter den Linden 12, Berlin"
    assert len(nominatim.requests) == 1
    clock.now += 2
    assert await cached.address(*BERLIN) == "Neue Straße, Berlin"
    assert len(nominatim.requests) == 2


async def test_cache_is_lru_bounded(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    cached = CachedGeocoder(street_level, max_entries=2)
    a, b, c = (52.50, 13.40), (52.51, 13.40), (52.52, 13.40)
    await cached.address(*a)
    await cached.address(*b)
    await cached.address(*a)  # a is now the most recently used
    await cached.address(*c)  # evicts b
    assert len(nominatim.requests) == 3
    await cached.address(*a)
    assert len(nominatim.requests) == 3
    await cached.address(*b)
    assert len(nominatim.requests) == 4


async def test_concurrent_lookups_share_one_request(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    nominatim.delay_s = 0.05
    cached = CachedGeocoder(street_level)
    answers = await asyncio.gather(*(cached.address(*BERLIN) for _ in range(20)))
    assert answers == ["Unter den Linden 12, Berlin"] * 20
    assert len(nominatim.requests) == 1


async def test_cached_none_and_fallback(nominatim: FakeNominatim, street_level: NominatimGeocoder) -> None:
    cached = CachedGeocoder(street_level)
    nominatim.answer({"error": "Unable to geocode"})
    assert await cached.address(*MID_ATLANTIC) is None
    assert await cached.address(*MID_ATLANTIC) is None
    assert len(nominatim.requests) == 1


async def test_open_geocoder(nominatim: FakeNominatim) -> None:
    offline = open_geocoder()
    online = open_geocoder(nominatim.url, user_agent="fleetgate-test")
    try:
        assert await offline.address(*BERLIN) == "Berlin, Germany"
        assert await online.address(*BERLIN) == "Unter den Linden 12, Berlin"
        assert nominatim.requests[0][1]["user-agent"] == "fleetgate-test"
        nominatim.answer({}, 500)
        assert await online.address(*NOTRE_DAME) == "Paris, France"
    finally:
        await offline.aclose()
        await online.aclose()
