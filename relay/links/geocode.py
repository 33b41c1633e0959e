"""Reverse geocoding for tracking-link viewers: a position in, a short human address out.

* :class:`PlaceTable` (default, offline): the nearest populated place of a bundled GeoNames table,
  "Town, Country", or None when no place lies within ``max_km`` (50 km: farther than that a town
  name says more about the map than about where the vehicle is).
* :class:`NominatimGeocoder`: street level ("Street 12, Town") from a Nominatim-compatible server;
  on any failure it answers with its fallback (the town table), so a viewer never waits on it.
* :class:`CachedGeocoder`: LRU + TTL cache by rounded coordinates, one lookup in flight per key.

:func:`open_geocoder` composes them. A geocoder never raises for a bad server or an odd position:
it answers None or its fallback's answer.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import math
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import httpx
import msgspec

from relay.links.model import EARTH_RADIUS_KM, distance_km

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_MAX_KM = 50.0


class Geocoder(Protocol):
    async def address(self, lat: float, lng: float) -> str | None:
        """A short address for the position, or None when there is none worth showing."""
        ...

    async def aclose(self) -> None:
        """Release connections (HTTP clients); the geocoder is not used after this."""
        ...


# --- the offline town table ---------------------------------------------------------------------


class _Places:
    """The table in memory, compact (~10 MB for 128k places, where tuples and strings took 45 MB).

    ``text`` is the decompressed file; ``starts[i]`` is where place ``i``'s line begins in it.
    ``cells`` maps 1-degree cells (row = floor(lat), col = floor(lng)) to the cell's coordinates
    (lat, lng interleaved) and place indexes.
    """

    def __init__(self, text: bytes, countries: dict[bytes, str]) -> None:
        self.text = text
        self.countries = countries
        self.starts = array("I")
        self.cells: dict[tuple[int, int], tuple[array[float], array[int]]] = {}

    def add(self, start: int, lat: float, lng: float) -> None:
        cell = self.cells.get(_cell(lat, lng))
        if cell is None:
            cell = self.cells[_cell(lat, lng)] = (array("d"), array("I"))
        cell[0].extend((lat, lng))
        cell[1].append(len(self.starts))
        self.starts.append(start)

    def name(self, index: int) -> str:
        start = self.starts[index]
        name, country, _ = self.text[start : self.text.index(b"\n", start)].split(b"\t", 2)
        return f"{name.decode()}, {self.countries.get(country) or country.decode()}"


_load_lock = threading.Lock()


@functools.cache
def _load_places(directory: Path) -> _Places:
    """Read ``places.tsv.gz`` and ``countries.tsv`` once per process (~0.2 s for 128k places)."""
    with _load_lock:  # one load even when two threads ask first (functools.cache alone would load twice)
        return _read_places(directory)


def _read_places(directory: Path) -> _Places:
    countries: dict[bytes, str] = {}
    for line in (directory / "countries.tsv").read_text(encoding="utf-8").splitlines():
        code, name = line.split("\t", 1)
        countries[code.encode()] = name
    places = _Places(gzip.decompress((directory / "places.tsv.gz").read_bytes()), countries)
    start = 0
    for row in places.text.split(b"\n"):
        if row:
            _, _, lat, lng = row.split(b"\t")
            places.add(start, float(lat), float(lng))
        start += len(row) + 1
    return places


_EMPTY: tuple[array[float], array[int]] = (array("d"), array("I"))


def _cell(lat: float, lng: float) -> tuple[int, int]:
    return min(math.floor(lat), 89), math.floor(lng)  # lat 90 belongs to the top row


def _columns(lat: float, lng: float, radius_km: float) -> Iterator[int]:
    """The cell columns a disc of ``radius_km`` around the point can touch, wrapping at 180 degrees."""
    delta = radius_km / EARTH_RADIUS_KM  # angular radius
    if abs(math.radians(lat)) + delta >= math.pi / 2:
        yield from range(-180, 180)  # the disc holds a pole: every longitude
        return
    # Widest longitude extent of a small circle that does not hold a pole.
    half = math.degrees(math.asin(min(1.0, math.sin(delta) / math.cos(math.radians(lat)))))
    first, last = math.floor(lng - half), math.floor(lng + half)
    if last - first >= 359:
        yield from range(-180, 180)
        return
    for col in range(first, last + 1):
        yield (col + 180) % 360 - 180


class PlaceTable:
    """Nearest populated place (GeoNames, 1000+ inhabitants) within ``max_km``: "Town, Country".

    The table loads on first use, in a worker thread, once per process; lookups then take well
    under a millisecond. The search widens in steps up to ``max_km``: a place found within the
    searched radius is certainly the nearest, because every cell the disc touches was looked at.
    """

    def __init__(self, *, max_km: float = DEFAULT_MAX_KM, directory: Path = DATA) -> None:
        if not 0 < max_km <= 1000:
            raise ValueError("max_km must be in (0, 1000]")
        self._max_km = max_km
        self._directory = directory
        self._places: _Places | None = None

    async def address(self, lat: float, lng: float) -> str | None:
        if self._places is None:
            self._places = await asyncio.to_thread(_load_places, self._directory)
        return self.nearest(lat, lng)

    def nearest(self, lat: float, lng: float) -> str | None:
        """The answer of :meth:`address`, synchronously (loads the table on the calling thread if needed)."""
        if not (-90.0 <= lat <= 90.0 and math.isfinite(lng)):
            return None
        if self._places is None:
            self._places = _load_places(self._directory)
        lng = (lng + 180.0) % 360.0 - 180.0
        radius = self._max_km / 8
        while True:
            found = self._nearest_within(self._places, lat, lng, radius)
            if found is not None or radius >= self._max_km:
                return found
            radius = min(radius * 2, self._max_km)

    @staticmethod
    def _nearest_within(places: _Places, lat: float, lng: float, radius_km: float) -> str | None:
        span = math.degrees(radius_km / EARTH_RADIUS_KM)
        rows = range(max(math.floor(lat - span), -90), min(math.floor(lat + span), 89) + 1)
        best, best_km = None, radius_km
        for col in _columns(lat, lng, radius_km):
            for row in rows:
                coordinates, indexes = places.cells.get((row, col), _EMPTY)
                for i, index in enumerate(indexes):
                    plat, plng = coordinates[2 * i], coordinates[2 * i + 1]
                    if abs(plat - lat) > span:  # cheap reject before the trigonometry
                        continue
                    km = distance_km(lat, lng, plat, plng)
                    if km <= best_km:
                        best, best_km = index, km
        return None if best is None else places.name(best)

    async def aclose(self) -> None:
        return None


# --- Nominatim ---------------------------------------------------------------------------------


class _NominatimAddress(msgspec.Struct, frozen=True):
    road: str | None = None
    house_number: str | None = None
    city: str | None = None
    town: str | None = None
    village: str | None = None


class _NominatimReverse(msgspec.Struct, frozen=True):
    address: _NominatimAddress | None = None  # absent with {"error": "Unable to geocode"}


_decode_reverse = msgspec.json.Decoder(_NominatimReverse).decode


def street_address(address: _NominatimAddress) -> str | None:
    """The street line, "Road 12, Town" (or without number or town); None without a road."""
    if not address.road:
        return None
    street = f"{address.road} {address.house_number}" if address.house_number else address.road
    town = address.city or address.town or address.village
    return f"{street}, {town}" if town else street


class NominatimGeocoder:
    """Street-level addresses from ``GET {base_url}/reverse?format=jsonv2`` (Nominatim or compatible).

    ``timeout_s`` bounds the whole request. A timeout, a connection failure, an HTTP error status
    or an unreadable body gives the ``fallback``'s answer (None without one); so does a position
    without a road. Failures are logged once per outage, not once per lookup.
    """

    def __init__(
        self, base_url: str, *, user_agent: str, timeout_s: float = 2.0, fallback: Geocoder | None = None
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._user_agent = user_agent  # Nominatim's usage policy requires an identifying User-Agent
        self._timeout_s = timeout_s
        self._fallback = fallback
        self._client: httpx.AsyncClient | None = None
        self._failing = False

    async def address(self, lat: float, lng: float) -> str | None:
        found = await self._street(lat, lng)
        if found is None and self._fallback is not None:
            return await self._fallback.address(lat, lng)
        return found

    async def _street(self, lat: float, lng: float) -> str | None:
        if self._client is None:
            headers = {"User-Agent": self._user_agent, "Accept": "application/json"}
            self._client = httpx.AsyncClient(headers=headers, timeout=self._timeout_s)
        params: dict[str, str | int] = {
            "format": "jsonv2",
            "lat": f"{lat:.6f}",
            "lon": f"{lng:.6f}",
            "zoom": 18,
            "addressdetails": 1,
        }
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.get(f"{self._base_url}/reverse", params=params)
            response.raise_for_status()
            reverse = _decode_reverse(response.content)
        except (httpx.HTTPError, msgspec.DecodeError, TimeoutError) as exc:
            if not self._failing:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("reverse geocoder %s failing (%s); using the fallback", self._base_url, reason)
            self._failing = True
            return None
        if self._failing:
            log.warning("reverse geocoder %s answers again", self._base_url)
            self._failing = False
        return None if reverse.address is None else street_address(reverse.address)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._fallback is not None:
            await self._fallback.aclose()


# --- the cache ---------------------------------------------------------------------------------


class CachedGeocoder:
    """Answers of ``inner`` by coordinates rounded to ``precision`` decimals (4: ~11 m), LRU + TTL.

    ``inner`` is asked with the rounded coordinates, so every point of a cache cell gets the same
    answer. Concurrent lookups of one cell share one call (many viewers of one stopped vehicle).
    None answers are cached too (open sea stays open sea); exceptions are not.
    """

    def __init__(
        self,
        inner: Geocoder,
        *,
        max_entries: int = 10_000,
        ttl_s: float = 3600.0,
        precision: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._inner = inner
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._precision = precision
        self._clock = clock
        self._entries: OrderedDict[tuple[float, float], tuple[str | None, float]] = OrderedDict()
        self._pending: dict[tuple[float, float], asyncio.Task[str | None]] = {}

    async def address(self, lat: float, lng: float) -> str | None:
        key = (round(lat, self._precision), round(lng, self._precision))
        entry = self._entries.get(key)
        if entry is not None and entry[1] > self._clock():
            self._entries.move_to_end(key)
            return entry[0]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._inner.address(*key))
            self._pending[key] = task
            task.add_done_callback(functools.partial(self._settle, key))
        return await asyncio.shield(task)  # a cancelled viewer does not cancel the others' lookup

    def _settle(self, key: tuple[float, float], task: asyncio.Task[str | None]) -> None:
        del self._pending[key]
        if task.cancelled() or task.exception() is not None:  # exception() also marks it retrieved
            return
        self._entries[key] = (task.result(), self._clock() + self._ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def aclose(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        self._entries.clear()
        await self._inner.aclose()


def open_geocoder(url: str = "", user_agent: str = "fleetgate") -> Geocoder:
    """The town table, or Nominatim at ``url`` with the town table as fallback; cached either way."""
    if not url:
        return CachedGeocoder(PlaceTable())
    return CachedGeocoder(NominatimGeocoder(url, user_agent=user_agent, fallback=PlaceTable()))
