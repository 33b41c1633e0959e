"""``fleetgate run`` (embedded, one process), ``gateway`` (distributed), ``tail`` and ``config``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from fleetgate.config import EXAMPLE, Config, ConfigError, load_config
from gateway import sdnotify
from gateway.bus import open_bus
from gateway.bus.base import Bus
from gateway.ops_http import TailSource, start_ops_server
from gateway.service import Gateway
from gateway.state import open_state
from gateway.state.base import StateStore
from relay.control import Control, open_control
from relay.links.store import open_link_store
from relay.pusher_state import open_pusher_state
from relay.ratelimit import open_rate_limiter
from relay.service import Relay, instance_id

log = logging.getLogger("fleetgate")
STOP_TIMEOUT_S = 8.0


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("run", help="run gateway (and relay) in one process, embedded defaults")
    p.add_argument("--config", help="TOML file (default: built-in defaults + FLEETGATE_* environment)")
    p.set_defaults(handler=lambda a: _serve(a, distributed=False))
    p = commands.add_parser("gateway", help="run a gateway for a distributed deployment (Redis required)")
    p.add_argument("--config", help="TOML file")
    p.set_defaults(handler=lambda a: _serve(a, distributed=True))
    p = commands.add_parser("relay", help="run a relay for a distributed deployment (Redis required)")
    p.add_argument("--config", help="TOML file")
    p.set_defaults(handler=lambda a: _serve(a, distributed=True, part="relay"))
    p = commands.add_parser("tail", help="print records as they are committed to the bus (JSON lines)")
    p.add_argument("--config", help="TOML file")
    p.add_argument("--from-start", action="store_true", help="begin with the records still retained")
    p.add_argument("--count", type=int, default=0, help="stop after this many records (0: never)")
    p.set_defaults(handler=_tail)
    p = commands.add_parser("config", help="show configuration")
    p.add_argument("--config", help="TOML file")
    p.add_argument("--example", action="store_true", help="print a commented example file")
    p.set_defaults(handler=_config)


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"fleetgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _config(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(EXAMPLE)
    else:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(_load(args)), indent=2).decode() + "\n")
    return 0


def _serve(args: argparse.Namespace, *, distributed: bool, part: str = "gateway") -> int:
    config = _load(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if distributed and (config.bus.driver != "redis" or config.state.driver != "redis"):
        print(
            f'fleetgate {part}: a distributed {part} needs Redis: set [bus] driver = "redis" and '
            '[state] driver = "redis" (or FLEETGATE_BUS__DRIVER=redis FLEETGATE_STATE__DRIVER=redis) '
            "and their redis_url",
            file=sys.stderr,
        )
        return 2
    _install_uvloop()
    if part == "relay":
        return asyncio.run(serve_relay(config))
    return asyncio.run(serve(config, with_relay=not distributed))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _control(config: Config) -> Control:
    distributed = config.bus.driver == "redis"
    return open_control(
        "redis" if distributed else "memory", config.bus.redis_url, config.bus.prefix, config.relay.instance_id
    )


def _relay(config: Config, bus: Bus, store: StateStore) -> Relay:
    """The relay, with the Pusher protocol's presence store and the rate limits on Redis when the bus is (like
    the control plane), and the tracking links beside the state store (same SQLite file, or Redis)."""
    driver = "redis" if config.bus.driver == "redis" else "memory"
    state = open_pusher_state(driver, config.bus.redis_url, config.bus.prefix, instance_id(config.relay))
    link_store = None
    if config.links.enabled:
        link_store = open_link_store(
            "redis" if config.state.driver == "redis" else "sqlite",
            sqlite_path=config.state.sqlite_path,
            redis_url=config.state.redis_url,
            prefix=config.state.prefix,
        )
    return Relay(
        config.relay,
        config.auth,
        bus,
        store,
        _control(config),
        pusher=config.pusher,
        pusher_state=state,
        links=config.links,
        link_store=link_store,
        rate_limiter=open_rate_limiter(driver, config.bus.redis_url, config.bus.prefix),
    )


async def serve(config: Config, *, with_relay: bool = True) -> int:
    """Start everything, announce readiness, run until SIGTERM/SIGINT, then stop within the timeout.

    ``fleetgate gateway`` starts no relay: in distributed mode relays run as ``fleetgate relay``.
    """
    bus = open_bus(config.bus)
    store = open_state(config.state)
    gateway = Gateway(config, bus, store)
    await gateway.start()
    relay: Relay | None = None
    if with_relay and config.relay.enabled:
        relay = _relay(config, bus, store)
        await relay.start()
    ops = await start_ops_server(config.metrics.host, config.metrics.port, gateway.health, tail=_tail_source(bus))
    stop = _stop_event()
    _announce(config, gateway, ops, relay)
    sdnotify.ready()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop())
    await stop.wait()
    sdnotify.stopping()
    log.info("stopping: finishing in-flight commits and ACKs")
    try:
        if relay is not None:
            await asyncio.wait_for(relay.stop(1.0), timeout=3.0)
        await asyncio.wait_for(gateway.stop(STOP_TIMEOUT_S), timeout=STOP_TIMEOUT_S + 1)
    except TimeoutError:
        log.warning("stop timed out; exiting anyway")
    watchdog.cancel()
    ops.close()
    with contextlib.suppress(Exception):
        await bus.close()
        await store.close()
    return 0


async def serve_relay(config: Config) -> int:
    """``fleetgate relay``: the relay alone, on the Redis bus and state store."""
    bus = open_bus(config.bus)
    store = open_state(config.state)
    relay = _relay(config, bus, store)
    await relay.start()
    stop = _stop_event()
    _announce_relay(config, relay, [f"fleetgate relay {relay.instance_id}, ready:"])
    sdnotify.ready()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop())
    await stop.wait()
    sdnotify.stopping()
    try:
        await asyncio.wait_for(relay.stop(2.0), timeout=4.0)
    except TimeoutError:
        log.warning("stop timed out; exiting anyway")
    watchdog.cancel()
    with contextlib.suppress(Exception):
        await bus.close()
        await store.close()
    return 0


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _tail_source(bus: Bus) -> TailSource:
    encode = msgspec.json.Encoder().encode

    async def lines(from_start: bool) -> AsyncIterator[bytes]:
        async for _, record in bus.tail(after="0" if from_start else "$"):
            yield encode(record) + b"\n"

    return lines


def _announce(config: Config, gateway: Gateway, ops: asyncio.Server, relay: Relay | None) -> None:
    host = config.listeners.host
    lines = [f"fleetgate {('embedded' if config.bus.driver == 'memory' else 'distributed')} mode, ready:"]
    for name in ("gt06", "teltonika", "teltonika-udp"):
        if name in gateway.servers or (name == "teltonika-udp" and gateway.udp is not None):
            kind = "udp" if name == "teltonika-udp" else "tcp"
            lines.append(f"  {name:<14} {kind}://{host}:{gateway.port(name)}")
    if config.mqtt.enabled:
        lines.append(f"  mqtt           subscribed at {config.mqtt.host}:{config.mqtt.port}")
    ops_port = ops.sockets[0].getsockname()[1]
    lines.append(f"  metrics        http://{config.metrics.host}:{ops_port}/metrics  (health: /healthz)")
    lines.append(f"  bus            {config.bus.driver}   state: {config.state.driver}")
    if relay is None:
        lines.append("  try: fleetgate simulate --protocol teltonika --devices 5   and   fleetgate tail")
        print("\n".join(lines), flush=True)
        return
    _announce_relay(config, relay, lines)


def _announce_relay(config: Config, relay: Relay, lines: list[str]) -> None:
    host = config.relay.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ws_url = config.relay.public_url.rstrip("/") or f"ws://{shown}:{relay.ws_port}"
    lines.append(f"  websocket      {ws_url}/ws   (native protocol, docs/protocol.md)")
    if relay.pusher is not None and config.pusher.apps:
        key = config.pusher.apps[0].key
        lines.append(f"  pusher         {ws_url}/app/{key}   (pusher-js, Laravel Echo, pysher: docs/pusher.md)")
    if relay.rest is not None:
        rest = f"http://{shown}:{relay.rest_port}"
        lines.append(f"  rest           {rest}   (OpenAPI: {rest}/schema, metrics: {rest}/metrics)")
        if relay.pusher is not None:
            lines.append(f"  channel auth   {rest}/broadcasting/auth   (Authorization: Bearer <token>)")
        if relay.links is not None:
            lines.append(f"  links          {rest}/api/tracking-links   (docs/tracking-links.md)")
    lines.append("  a token for an office dashboard (development secret):")
    lines.append("    fleetgate token --role office --company simulated --user office-1 --ttl 8h")
    lines.append(
        "  then: fleetgate simulate --protocol teltonika --devices 5 --register, and subscribe with "
        '{"action":"subscribe","all":true}'
    )
    print("\n".join(lines), flush=True)


def _tail(args: argparse.Namespace) -> int:
    config = _load(args)
    return asyncio.run(tail(config, from_start=args.from_start, count=args.count))


async def tail(config: Config, *, from_start: bool, count: int) -> int:
    """Print committed records as JSON lines: from Redis directly, or from an embedded process's ops port."""
    encoder = msgspec.json.Encoder()
    seen = 0
    if config.bus.driver == "redis":
        bus = open_bus(config.bus)
        try:
            async for _, record in bus.tail(after="0" if from_start else "$"):
                sys.stdout.write(encoder.encode(record).decode() + "\n")
                sys.stdout.flush()
                seen += 1
                if count and seen >= count:
                    break
        finally:
            await bus.close()
        return 0
    reader, writer = await asyncio.open_connection(config.metrics.host, config.metrics.port)
    query = "?from=start" if from_start else ""
    writer.write(f"GET /tail{query} HTTP/1.1\r\nHost: fleetgate\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        print(f"fleetgate tail: {status.decode().strip()}", file=sys.stderr)
        return 1
    while (await reader.readline()).strip():
        pass  # headers
    async for line in reader:
        if line.strip():
            sys.stdout.write(line.decode())
            sys.stdout.flush()
            seen += 1
            if count and seen >= count:
                break
    writer.close()
    return 0
