"""``fleetgate devices``: the device registry in the configured state store (add, list, remove, import).

The store is the one the gateway uses: ``[state]`` of ``--config FILE`` and
``FLEETGATE_STATE__*`` environment variables, overridden by ``--state-driver``,
``--sqlite-path`` and ``--redis-url``. A running gateway sees the changes on
the next login of the device.

``import FILE`` reads CSV with the header
``imei,asset_id,company_id,display_name,speed_limit_kmh,protocol`` (the last
three columns optional, cells may be empty) or JSON, a list of objects with
those keys (``list --json`` writes that form). ``.json`` / ``.csv`` decide,
otherwise the content does; ``-`` reads stdin. Every row is checked first:
one bad row (the message gives its line) and nothing is imported.

An IMEI is exactly 15 digits, as a GT06 login (16 BCD digits, the first a
filler) and a Teltonika handshake give it: a 14-digit IMEI without its
check digit or a 16-digit IMEISV would never match a login. The Luhn check
digit is not enforced, because cloned trackers with invalid ones exist.

Exit status: 0 done, 1 nothing found to remove, bad import file or store
unreachable, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import re
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec
from redis.exceptions import RedisError

from fleetgate.config import ConfigError, load_config
from gateway.records import Device
from gateway.settings import StateSettings
from gateway.state import StateStore, open_state

PROTOCOLS = ("gt06", "teltonika", "mqtt")
COLUMNS = ("imei", "asset_id", "company_id", "display_name", "speed_limit_kmh", "protocol")
REQUIRED = ("imei", "asset_id", "company_id")
IMEI = re.compile(r"[0-9]{15}")


class RowError(ValueError):
    """A registry entry that cannot be used; the message says which field and why."""


class ImportFileError(ValueError):
    """An import file that cannot be used, at ``line`` (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


# -- command line ------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "devices",
        help="manage the device registry (add, list, remove, import)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="devices_command", required=True, metavar="{add,list,remove,import}")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--config", help="TOML file (default: built-in defaults + FLEETGATE_* environment)")
    store.add_argument("--state-driver", choices=("sqlite", "redis"), help="overrides [state] driver")
    store.add_argument("--sqlite-path", help="overrides [state] sqlite_path")
    store.add_argument("--redis-url", help="overrides [state] redis_url")

    add = sub.add_parser("add", parents=[store], help="register a device, or replace its entry")
    add.add_argument("imei", help="15 digits")
    add.add_argument("--asset", required=True, help="asset id the positions are filed under")
    add.add_argument("--company", required=True, help="company id")
    add.add_argument("--name", default="", help="display name")
    add.add_argument("--speed-limit", type=float, metavar="KMH", help="speed limit in km/h")
    add.add_argument("--protocol", choices=PROTOCOLS, help="accept the device on this protocol only")
    add.set_defaults(handler=_add)

    lst = sub.add_parser("list", parents=[store], help="list devices ordered by IMEI")
    lst.add_argument("--company", help="only this company's devices")
    lst.add_argument("--json", action="store_true", help="a JSON list of objects, the form `import` reads")
    lst.set_defaults(handler=_list)

    rm = sub.add_parser("remove", parents=[store], help="remove a device")
    rm.add_argument("imei")
    rm.set_defaults(handler=_remove)

    imp = sub.add_parser("import", parents=[store], help="add or update devices from a CSV or JSON file")
    imp.add_argument("file", help="CSV or JSON file, - for stdin")
    imp.set_defaults(handler=_import)


def state_settings(args: argparse.Namespace) -> StateSettings:
    """``[state]`` from the configuration (file and environment), then the command-line overrides."""
    settings = load_config(args.config).state
    overrides = {"driver": args.state_driver, "sqlite_path": args.sqlite_path, "redis_url": args.redis_url}
    return msgspec.structs.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _fail(message: str, status: int) -> int:
    print(f"fleetgate devices: {message}", file=sys.stderr)
    return status


def _with_store(args: argparse.Namespace, action: Callable[[StateStore], Awaitable[int]]) -> int:
    """Open the configured store, run ``action`` on it, close it; store failures become exit status 1."""
    try:
        settings = state_settings(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)

    async def run() -> int:
        store = open_state(settings)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (OSError, sqlite3.Error, RedisError) as exc:
        where = settings.sqlite_path if settings.driver == "sqlite" else settings.redis_url
        return _fail(f"state store ({settings.driver} {where}): {exc}", 1)


# -- subcommands -------------------------------------------------------------------


def _add(args: argparse.Namespace) -> int:
    fields = {
        "imei": args.imei,
        "asset_id": args.asset,
        "company_id": args.company,
        "display_name": args.name,
        "speed_limit_kmh": args.speed_limit,
        "protocol": args.protocol,
    }
    try:
        device = device_from_fields(fields)
    except RowError as exc:
        return _fail(str(exc), 2)

    async def add(store: StateStore) -> int:
        existed = await store.get_device(device.imei) is not None
        await store.put_device(device)
        print(
            f"{'updated' if existed else 'added'} {device.imei}: asset {device.asset_id}, company {device.company_id}"
        )
        return 0

    return _with_store(args, add)


def _list(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    async def show(store: StateStore) -> int:
        devices = await store.list_devices(args.company)
        if args.json:
            out.write(msgspec.json.format(msgspec.json.encode([msgspec.structs.asdict(d) for d in devices])).decode())
            out.write("\n")
        else:
            out.write("".join(line + "\n" for line in render_table(devices)))
        return 0

    return _with_store(args, show)


def _remove(args: argparse.Namespace) -> int:
    async def remove(store: StateStore) -> int:
        if not await store.remove_device(args.imei):
            return _fail(f"no device with IMEI {args.imei}", 1)
        print(f"removed {args.imei}")
        return 0

    return _with_store(args, remove)


def _import(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8-sig")
        devices = read_devices(text, json_hint=_json_hint(args.file))
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}", 1)
    except UnicodeDecodeError:
        return _fail(f"{args.file}: not UTF-8 text; nothing imported", 1)
    except ImportFileError as exc:
        return _fail(f"{args.file}: {exc}; nothing imported", 1)

    async def store_all(store: StateStore) -> int:
        existing = {d.imei: d for d in await store.list_devices()}
        added = updated = 0
        for device in devices:
            old = existing.get(device.imei)
            if old != device:
                await store.put_device(device)
                added, updated = (added + 1, updated) if old is None else (added, updated + 1)
        unchanged = len(devices) - added - updated
        count = f"{len(devices)} device{'' if len(devices) == 1 else 's'}"
        print(f"{args.file}: {count}: {added} added, {updated} updated, {unchanged} unchanged")
        return 0

    return _with_store(args, store_all)


def render_table(devices: list[Device]) -> Iterator[str]:
    """Aligned columns, the display name last (it may hold spaces)."""
    if not devices:
        yield "(no devices)"
        return
    rows = [("IMEI", "ASSET", "COMPANY", "PROTOCOL", "LIMIT KMH", "NAME")]
    for d in devices:
        limit = "-" if d.speed_limit_kmh is None else f"{d.speed_limit_kmh:g}"
        rows.append((d.imei, d.asset_id, d.company_id, d.protocol or "any", limit, d.display_name))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        yield "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[5]]).rstrip()


# -- import files --------------------------------------------------------------------


def _json_hint(name: str) -> bool | None:
    return {".json": True, ".csv": False}.get(Path(name).suffix.lower())


def read_devices(text: str, *, json_hint: bool | None = None) -> list[Device]:
    """Every device of a CSV or JSON import file, all checked; raises :class:`ImportFileError` at the first bad row.

    ``json_hint`` (from the file name) decides the format; when None, a file whose first non-blank character is
    ``[`` is JSON.
    """
    is_json = text.lstrip().startswith("[") if json_hint is None else json_hint
    rows = json_rows(text) if is_json else csv_rows(text)
    devices: list[Device] = []
    first_seen: dict[str, int] = {}
    for line, fields in rows:
        try:
            device = device_from_fields(fields)
        except RowError as exc:
            raise ImportFileError(line, str(exc)) from None
        if device.imei in first_seen:
            raise ImportFileError(line, f"IMEI {device.imei} already on line {first_seen[device.imei]}")
        first_seen[device.imei] = line
        devices.append(device)
    return devices


def csv_rows(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the row starts, cells by column) for every non-blank row after the header."""
    reader = csv.reader(io.StringIO(text))
    header = [name.strip().lower() for name in next(reader, [])]
    _check_header(header)
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            raise ImportFileError(start, f"{len(cells)} cells, the header names {len(header)} columns")
        yield start, dict(zip(header, cells, strict=False))  # missing trailing cells: empty optional columns


def _check_header(header: list[str]) -> None:
    if not any(header):
        raise ImportFileError(1, f"expected a header line: {','.join(COLUMNS)}")
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise ImportFileError(1, f"unknown column {unknown[0]!r}; columns are {','.join(COLUMNS)}")
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise ImportFileError(1, f"missing column {missing[0]!r}; required are {','.join(REQUIRED)}")
    if len(set(header)) != len(header):
        raise ImportFileError(1, "a column is named twice")


def json_rows(text: str) -> Iterator[tuple[int, dict[str, object]]]:
    """(line where the object starts, the object) for every element of a JSON list.

    The list is walked element by element with ``raw_decode`` so that each row keeps its line number.
    """
    decoder = json.JSONDecoder()
    line_of = _LineCounter(text)
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise ImportFileError(line_of(pos), "expected a JSON list of objects")
    pos = _skip_space(text, pos + 1)
    more = not text.startswith("]", pos)
    while more:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ImportFileError(exc.lineno, f"not valid JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ImportFileError(line_of(pos), f"expected an object, not {type(value).__name__}")
        yield line_of(pos), value
        pos = _skip_space(text, end)
        more = text.startswith(",", pos)
        if more:
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise ImportFileError(line_of(pos), "expected ',' or ']' after an object")
    pos = _skip_space(text, pos + 1)  # past the "]"
    if pos < len(text):
        raise ImportFileError(line_of(pos), "text after the end of the list")


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, pos: int) -> int:
    match = _JSON_SPACE.match(text, pos)
    return pos if match is None else match.end()


class _LineCounter:
    """Line number of a position in ``text``, for positions that only move forward (linear, not quadratic)."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1

    def __call__(self, pos: int) -> int:
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


# -- one entry -----------------------------------------------------------------------


def device_from_fields(fields: Mapping[str, object]) -> Device:
    """A registry entry from CSV cells or JSON values; raises :class:`RowError` saying what is wrong."""
    unknown = [key for key in fields if key not in COLUMNS]
    if unknown:
        raise RowError(f"unknown key {unknown[0]!r}; keys are {','.join(COLUMNS)}")
    imei = _text(fields, "imei", required=True)
    if not IMEI.fullmatch(imei):
        raise RowError(f"imei {imei!r} is not 15 digits")
    protocol = _text(fields, "protocol") or None
    if protocol is not None and protocol not in PROTOCOLS:
        raise RowError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return Device(
        imei=imei,
        asset_id=_text(fields, "asset_id", required=True),
        company_id=_text(fields, "company_id", required=True),
        display_name=_text(fields, "display_name"),
        speed_limit_kmh=_speed_limit(fields.get("speed_limit_kmh")),
        protocol=protocol,
    )


def _text(fields: Mapping[str, object], key: str, *, required: bool = False) -> str:
    value = fields.get(key)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RowError(f"{key} must be a string, not {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise RowError(f"{key} is missing")
    return value


def _speed_limit(value: object) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RowError(f"speed_limit_kmh must be a number, not {type(value).__name__}")
    try:
        kmh = float(value)
    except ValueError:
        raise RowError(f"speed_limit_kmh {value!r} is not a number") from None
    if not math.isfinite(kmh) or kmh <= 0:
        raise RowError(f"speed_limit_kmh {value!r} must be a positive number of km/h")
    return kmh
