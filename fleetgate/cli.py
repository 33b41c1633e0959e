"""The ``fleetgate`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fleetgate import decode, devices, run, simulate, token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetgate", description="GPS-tracker ingestion gateway and live relay.")
    commands = parser.add_subparsers(dest="command", required=True)
    decode.add_parser(commands)
    devices.add_parser(commands)
    run.add_parsers(commands)
    simulate.add_parser(commands)
    token.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
