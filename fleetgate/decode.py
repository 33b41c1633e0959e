"""``fleetgate decode``: decode captured tracker frames for someone debugging a device in the field.

Input is hex (arguments, or one capture per line on stdin); spaces, colons
and ``0x`` prefixes are tolerated. ``--json`` prints one JSON object per
input line; without it a readable summary is printed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from trackcodecs.oneshot import PROTOCOLS, Capture, decode_capture

# Vendor example frames (Concox GT06 and Teltonika documentation) shown by --demo.
DEMO_FRAMES = (
    "78780d01012345678901234500018cdd0d0a",
    "78781f120b081d112e10cf027ac7eb0c46584900148f01cc00287d001fb8000380810d0a",
    "787825160b0b0f0e241dcf027ac8870c4657e60014020901cc00287d001f726506040101003656a40d0a",
    "78780a134004040001000fdcee0d0a",
    "000f333536333037303432343431303133",
    "000000000000003608010000016b40d8ea30010000000000000000000000000000000105021503010101425e0f01f10000601a014e0000000000000000010000c7cf",
    "003dcafe0105000f33353230393330383634303336353508010000016b4f815b30010000000000000000000000000000000103021503010101425dbc000001",
)

_HEX_NOISE = re.compile(r"0x|[\s:,\-]", re.IGNORECASE)


class HexError(ValueError):
    """An input line that is not hexadecimal."""


def parse_hex(text: str) -> bytes:
    """Bytes from hex text, tolerating spaces, colons, dashes and ``0x`` prefixes."""
    cleaned = _HEX_NOISE.sub("", text)
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise HexError(f"not hexadecimal: {text.strip()[:60]!r}") from None


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "decode",
        help="decode tracker frames given as hex",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("hex", nargs="*", help="captures as hex; read from stdin, one per line, when absent")
    p.add_argument("--protocol", choices=("auto", *PROTOCOLS), default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument(
        "--crc",
        choices=("reject", "count"),
        default="reject",
        help="on a CRC mismatch: reject the frame (default) or decode it and flag it",
    )
    p.add_argument("--demo", action="store_true", help="decode a few vendor example frames")
    p.set_defaults(handler=run)


def _inputs(args: argparse.Namespace, stdin: TextIO) -> Iterator[str]:
    if args.demo:
        yield from DEMO_FRAMES
    elif args.hex:
        yield from args.hex
    else:
        yield from (line for line in stdin if line.strip() and not line.lstrip().startswith("#"))


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Decode every input; exit status 1 when any input failed, 0 otherwise."""
    failed = False
    encoder = msgspec.json.Encoder()
    for text in _inputs(args, stdin):
        now = datetime.now(UTC)
        try:
            capture = decode_capture(parse_hex(text), protocol=args.protocol, now=now, crc_policy=args.crc)
        except HexError as exc:
            capture = Capture(
                protocol="gt06" if args.protocol == "auto" else args.protocol,
                ok=False,
                error="bad_hex",
                crc_ok=None,
                reply_hex=None,
                events=[],
            )
            print(f"fleetgate decode: {exc}", file=sys.stderr)
        failed |= not capture.ok
        if args.json:
            out.write(encoder.encode(capture).decode() + "\n")
        else:
            out.write("\n".join(render(text, capture)) + "\n\n")
    return 1 if failed else 0


def render(text: str, capture: Capture) -> Iterable[str]:
    """A readable summary of one capture."""
    crc = {None: "n/a", True: "ok", False: "MISMATCH"}[capture.crc_ok]
    status = "ok" if capture.ok else f"ERROR {capture.error}"
    yield f"input     {_short(_HEX_NOISE.sub('', text).lower())}"
    yield f"protocol  {capture.protocol}   status {status}   crc {crc}"
    yield f"reply     {capture.reply_hex or '(none)'}"
    for event in capture.events:
        yield from _render_event(event)


def _render_event(event: dict[str, Any]) -> Iterable[str]:
    kind = event["type"]
    if kind == "position":
        yield (
            f"  position  {event['fix_time'] or 'no-date'}  {event['lat']:.6f},{event['lng']:.6f}"
            f"  {event['speed_kmh']:g} km/h  course {event['course']}  sats {event['satellites']}"
            f"  {'valid' if event['valid'] else 'INVALID'}"
        )
        extras = {k: v for k, v in event.items() if k not in _SHOWN_POSITION_KEYS}
        if extras:
            yield "            " + "  ".join(f"{k}={_value(v)}" for k, v in extras.items())
        return
    details = "  ".join(f"{k}={_value(v)}" for k, v in event.items() if k != "type")
    yield f"  {kind:<9} {details}"


_SHOWN_POSITION_KEYS = {"type", "fix_time", "lat", "lng", "speed_kmh", "course", "satellites", "valid"}


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and len(value) > 48:
        return value[:45] + "..."
    return str(value)


def _short(hexstr: str) -> str:
    return hexstr if len(hexstr) <= 96 else f"{hexstr[:90]}... ({len(hexstr) // 2} bytes)"
