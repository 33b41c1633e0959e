"""``fleetgate token``: mint a development access token and print it on stdout (one line).

The token is HS256, signed with the ``[auth]`` shared secret of ``--config FILE``
and ``FLEETGATE_AUTH__*`` environment variables: ``secret`` when set, else the
content of ``secret_file`` (default ``fleetgate.secret`` in the working
directory, created with a random secret when missing). ``fleetgate run`` started
in the same directory with the same configuration accepts the token.

Production deployments sign tokens in their own identity service (RS256/ES256
with ``public_key_file`` or ``jwks_file``); this command refuses to mint when
``[auth] algorithms`` lacks HS256.

Exit status: 0 printed, 1 secret file unreadable, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fleetgate.config import ConfigError, load_config
from relay.tokens import ROLES, mint_token, parse_duration


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "token",
        help="mint a development access token (HS256, shared secret)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--company", required=True, help="company id")
    p.add_argument("--user", required=True, help="user id (the sub claim)")
    p.add_argument("--ttl", type=_ttl, default="1h", help="lifetime: 90, 90s, 15m, 1h, 2d (default 1h)")
    p.add_argument(
        "--asset", action="append", dest="assets", metavar="ASSET", help="restrict to this asset id (repeatable)"
    )
    p.add_argument("--name", help="display name")
    p.add_argument("--email", help="e-mail address")
    p.add_argument("--config", help="TOML file (default: built-in defaults + FLEETGATE_* environment)")
    p.set_defaults(handler=_mint)


def _ttl(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the ttl must be positive")
    return seconds


def _mint(args: argparse.Namespace) -> int:
    try:
        token = mint_token(
            load_config(args.config).auth,
            role=args.role,
            company=args.company,
            user=args.user,
            ttl_s=args.ttl,
            assets=args.assets,
            name=args.name,
            email=args.email,
        )
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(f"secret file: {exc}", 1)
    print(token)
    return 0


def _fail(message: str, status: int) -> int:
    print(f"fleetgate token: {message}", file=sys.stderr)
    return status
