"""``fleetgate simulate``: simulated GT06 / Teltonika trackers against a running gateway.

The devices speak the real protocols (see :mod:`gateway.simulator`): they log
in, send positions every ``--interval`` seconds, wait for ACKs, reconnect and
resend what was not ACKed. A progress line goes to stderr (rewritten in place
on a terminal, one line every few seconds otherwise), a summary to stdout.

Fix times are whole seconds apart: ``--interval`` / K within a Teltonika
packet of K records (at least 1 s), ``--interval`` for GT06; with a shorter
interval than that they run ahead of the clock (load runs).

The gateway refuses unknown IMEIs by default: ``--register`` first writes the
simulated devices into the registry the gateway uses (``[state]`` of
``--config`` and ``FLEETGATE_STATE__*``), or start the gateway with
``FLEETGATE_REGISTRY__UNKNOWN_DEVICES=register``.

Exit status: 0 done, 1 no device got through (all refused, or no connection),
2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from typing import Any, TextIO

from fleetgate.config import ConfigError, load_config
from gateway.records import Device
from gateway.simulator import DEFAULT_IMEI_BASE, DEFAULT_PORTS, PROTOCOLS, Simulation, SimulationStats
from gateway.state import open_state

TTY_REFRESH_S = 0.5
LOG_REFRESH_S = 5.0


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "simulate",
        help="simulated GT06 / Teltonika trackers against a gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default="teltonika", help="default: teltonika")
    p.add_argument("--devices", type=_positive_int, default=1, help="number of devices (default 1)")
    p.add_argument(
        "--interval",
        type=_non_negative,
        default=10.0,
        metavar="S",
        help="seconds between two sends of a device; 0: as fast as ACKs come back (default 10)",
    )
    p.add_argument("--duration", type=_non_negative, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    p.add_argument(
        "--records",
        type=_positive_int,
        metavar="N",
        help="send exactly N records in all, then stop once all were ACKed",
    )
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="default: 5023 for gt06, 5027 for teltonika and teltonika-udp")
    p.add_argument(
        "--records-per-packet",
        type=int,
        default=10,
        metavar="K",
        help="Teltonika records per packet / datagram, 1-255 (default 10)",
    )
    p.add_argument(
        "--imei-base",
        default=DEFAULT_IMEI_BASE,
        metavar="IMEI",
        help=f"first 14 digits of the first IMEI; a Luhn digit is appended (default {DEFAULT_IMEI_BASE})",
    )
    p.add_argument("--seed", type=int, default=0, help="routes are deterministic for a seed (default 0)")
    p.add_argument(
        "--ack-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="resend (reconnect on TCP) when an ACK takes longer (default 5)",
    )
    p.add_argument(
        "--register",
        action="store_true",
        help="first register the simulated devices in the gateway's registry (see --config)",
    )
    p.add_argument("--company", default="simulated", help="company id of devices added by --register")
    p.add_argument("--config", help="TOML file whose [state] --register writes to (plus FLEETGATE_* environment)")
    p.set_defaults(handler=_simulate)  # fmt: skip


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _simulate(args: argparse.Namespace) -> int:
    try:
        sim = Simulation(
            args.protocol,
            args.devices,
            args.host,
            args.port,
            args.interval,
            duration=args.duration,
            records_per_packet=args.records_per_packet,
            total_records=args.records,
            imei_base=args.imei_base,
            seed=args.seed,
            ack_timeout=args.ack_timeout,
            deadline=args.duration if args.duration is not None else 60.0 + args.ack_timeout,
            record_latency=True,
        )
    except ValueError as exc:
        print(f"fleetgate simulate: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config) if args.register else None
    except ConfigError as exc:
        print(f"fleetgate simulate: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    return asyncio.run(simulate(sim, args, config))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def simulate(sim: Simulation, args: argparse.Namespace, config: Any = None, err: TextIO = sys.stderr) -> int:
    """Register (when asked), run with a progress line, print the summary; the exit status."""
    if config is not None:
        await register(sim, config, args.company)
        print(f"registered {len(sim.imeis)} devices (company {args.company!r})", file=err)
    first, last = sim.imeis[0], sim.imeis[-1]
    where = f"{'udp' if sim.protocol == 'teltonika-udp' else 'tcp'}://{sim.host}:{sim.port}"
    print(f"simulating {len(sim.imeis)} {sim.protocol} devices ({first}{' .. ' + last if last != first else ''}) "
          f"against {where}; Ctrl-C stops", file=err)  # fmt: skip
    loop = asyncio.get_running_loop()
    interrupts = 0

    def interrupted() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print(f"\nstopping: waiting up to {sim.grace:.0f} s for outstanding ACKs (Ctrl-C again: now)", file=err)
            sim.stop()
        else:
            sim.abort()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers on this platform/thread
        loop.add_signal_handler(signal.SIGINT, interrupted)
        loop.add_signal_handler(signal.SIGTERM, interrupted)
    progress = Progress(sim, err)
    ticker = asyncio.create_task(progress.run())
    try:
        stats = await sim.run()
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    progress.finish()
    print(summary(sim, stats))
    for hint in hints(sim, stats):
        print(f"hint: {hint}", file=err)
    return 0 if stats.logins else 1


async def register(sim: Simulation, config: Any, company: str) -> None:
    """Put every simulated IMEI into the configured registry (asset ``sim-<n>``), as ``fleetgate devices add``."""
    store = open_state(config.state)
    try:
        for n, imei in enumerate(sim.imeis, start=1):
            await store.put_device(
                Device(imei=imei, asset_id=f"sim-{n}", company_id=company, display_name=f"Simulated {n}")
            )
    finally:
        await store.close()


class Progress:
    """The live line: devices connected, records sent / ACKed / resent, ACK rate."""

    def __init__(self, sim: Simulation, out: TextIO) -> None:
        self.sim = sim
        self.out = out
        self.tty = out.isatty()
        self.last = (time.monotonic(), 0)
        self.width = 0

    async def run(self) -> None:
        period = TTY_REFRESH_S if self.tty else LOG_REFRESH_S
        while True:
            await asyncio.sleep(period)
            self.show()

    def line(self) -> str:
        s = self.sim.stats
        now = time.monotonic()
        then, acked = self.last
        rate = (s.records_acked - acked) / max(now - then, 1e-9)
        self.last = (now, s.records_acked)
        return (
            f"[{now - s.started:6.0f}s] connected {s.connected}/{len(self.sim.imeis)}  sent {s.records_sent}  "
            f"acked {s.records_acked}  resent {s.records_resent}  reconnects {s.reconnects}  "
            f"rejected {s.rejected}  {rate:,.0f} records/s"
        )

    def show(self) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()


def summary(sim: Simulation, stats: SimulationStats) -> str:
    elapsed = time.monotonic() - stats.started
    lines = [
        f"{len(sim.imeis)} {sim.protocol} devices, {elapsed:.1f} s against {sim.host}:{sim.port}",
        f"records: {stats.records_sent} sent, {stats.records_acked} ACKed, {stats.records_resent} resent "
        f"({stats.records_acked / max(elapsed, 1e-9):,.0f} ACKed/s)",
        f"devices: {stats.rejected} rejected, {stats.reconnects} reconnects, {stats.connect_failures} failed connects",
    ]
    if stats.latencies:
        samples = sorted(stats.latencies)
        p50, p99 = samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        lines.append(f"ACK latency: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms ({len(samples)} ACKs)")
    return "\n".join(lines)


def hints(sim: Simulation, stats: SimulationStats) -> list[str]:
    out = []
    if stats.rejected:
        out.append(
            f"{stats.rejected} devices were refused: the gateway does not know their IMEIs. Register them with "
            "`fleetgate simulate ... --register` (same --config as the gateway) or `fleetgate devices add IMEI "
            "--asset A --company C`, or run the gateway with FLEETGATE_REGISTRY__UNKNOWN_DEVICES=register"
        )
    if sim.protocol == "teltonika-udp" and stats.records_sent and not stats.records_acked:
        out.append(
            f"no UDP ACK came back: nothing listens on udp://{sim.host}:{sim.port}, or the gateway does not "
            "know the IMEIs (it does not answer unknown devices; see --register)"
        )
    if stats.connect_failures and not stats.records_acked and sim.protocol != "teltonika-udp":
        port_note = "" if sim.port != DEFAULT_PORTS[sim.protocol] else " (the default port)"
        out.append(
            f"could not connect to {sim.host}:{sim.port}{port_note}: {stats.last_error or 'refused'}; "
            "is the gateway running (fleetgate run)?"
        )
    return out
