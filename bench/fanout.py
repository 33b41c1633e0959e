"""Relay fan-out over loopback, printed as one JSON object.

Every server runs in a *child process* (uvloop, compression off, the GC tuned
as ``fleetgate run`` tunes it); subscribers live in two client processes that
speak just enough RFC 6455 (handshake, masked client frames, pong) to stay
cheap, and count or time the frames they read (``bench/wsclient.py``).

* ``fanout``: N office subscribers (``subscribe all`` on one company) on the
  real ``Relay`` (MemoryBus + SQLite store); the server publishes records onto
  the bus, one record per event-loop turn (``batch`` 1) or 20 per turn, as the
  bus feed hands them over. The reference is a ``websockets.asyncio.server``
  ``serve()`` server calling ``websockets.broadcast(subscribers, payload,
  text=True)`` once per record (JSON encoded once). Records go out in rounds,
  a few rounds in flight (so no client is ever ``--seconds`` behind and no
  buffer grows without bound); ``deliveries_per_s`` = frames received / wall
  time from the first publish until the last client has every frame;
  ``cpu_us_per_delivery`` = server CPU (user + sys, /proc) over that window /
  frames. ``ratio`` = relay / broadcast. The relay runs twice: with its
  default ``flush_interval_ms`` (frames for one socket within that window go
  out in one write) and with 0 (``relay_flush_each_turn``: one write per
  socket per event-loop turn), to show what the window buys.
* ``idle_rss_kib_per_subscriber``: server VmRSS after N authenticated,
  subscribed, idle connections minus VmRSS before (after a warm-up of a few
  connections), / N, for the largest N.
* ``pusher``: N Pusher-protocol subscribers (``/app/{key}?protocol=7``, a
  signed ``pusher:subscribe`` to ``private-account.{company}``), the same rounds:
  ``records``: the relay's records published onto the bus, batched per
  ``[pusher] batch_window_ms`` into ``location.updated`` events (units: records
  inside the events); ``events``: events of ~400 bytes of data, triggered by a
  publisher process through the signed HTTP API (``POST /apps/{id}/events``,
  keep-alive) or, to show what HTTP costs, by the relay process itself. The
  references: a ``serve()`` server speaking just enough Pusher that
  broadcasts the same frames (records: batched the same way; events: one
  broadcast each, generated in-process, no HTTP), and soketi (when ``node``
  is on PATH; ``npm ci`` in ``bench/soketi`` on first use) under the same
  HTTP API load.
* ``latency``: ``fleetgate run`` wiring in one child (Gateway + Relay on one
  MemoryBus and SQLite store, devices registered first), simulated Teltonika
  devices (``gateway.simulator``, own process) sending one record per packet
  every second, and office subscribers (companies of 100 devices; per company
  10 % of the subscribers watch ``all``, the others one asset each). Latency =
  client receive time - the record's ``received_at`` (gateway read time; the
  simulator's ``fix_time`` is on a whole-second grid, not the send time).

    python bench/fanout.py [--subscribers 1000,10000] [--batches 1,20] [--seconds 3]
                           [--pusher-subscribers 1000] [--no-soketi]
                           [--latency-devices 2000] [--latency-subscribers 2000] [--latency-seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "codecs"), str(ROOT)]

import msgspec  # noqa: E402

from bench.soketi_peer import SoketiPeer  # noqa: E402
from bench.wsclient import (  # noqa: E402
    ALL_SHARE,
    COMPANY,
    DEVICES_PER_COMPANY,
    SECRET,
    Child,
    clients_main,
    close,
    commands,
    connect,
    cpu_seconds,
    die_with_parent,
    fleet_of,
    ms,
    progress,
    publisher_main,
    rounds_run,
    rss_bytes,
    say,
)
from gateway.records import TrackedPosition, record_id  # noqa: E402
from gateway.simulator import DEFAULT_IMEI_BASE, imei_for  # noqa: E402
from relay.native import native_location  # noqa: E402

Child.script = str(Path(__file__).resolve())
ROUND_RECORDS_MAX = 200  # 3 rounds in flight (INFLIGHT_ROUNDS): at most ~200 KB queued toward a socket (1 MiB drops)
WARM_CONNECTIONS = 40
POOL = 30_000  # records built before the server reports ready (more are built on demand, inside the window)
_encode = msgspec.json.Encoder().encode

# The Pusher runs: one app, with an explicit secret, on the relay, the reference and soketi alike.
PUSHER_APP_ID, PUSHER_KEY, PUSHER_SECRET = "4242", "fanout-bench-key", "fanout-bench-pusher-secret"
PUSHER_CHANNEL = f"private-account.{COMPANY}"
PUSHER_EVENT = "bench.notice"
# Up to ~330 KB queued toward a socket (200 records of ~550 escaped bytes, 3 rounds in flight; 1 MiB drops).
PUSHER_RECORDS_PER_ROUND = 200
PUSHER_PUBLISH_BATCH = 20  # records per event-loop turn, as a busy bus feed hands them over
PUSHER_WARM_EVENTS = 10
HTTP_CONNECTIONS = 4  # keep-alive connections of the HTTP API publisher


def _event_data(size: int = 400) -> str:
    """The data of a triggered event: a JSON object of ``size`` bytes, as a string (what the HTTP API takes)."""
    notice = {"type": "geofence.entered", "assetId": "van-0042", "companyId": COMPANY, "geofence": "depot-north",
              "at": "2025-01-01T12:00:00Z", "lat": 54.6872, "lng": 25.2797, "note": ""}  # fmt: skip
    notice["note"] = "x" * max(0, size - len(_encode(notice)))
    return _encode(notice).decode()


PUSHER_EVENT_DATA = _event_data()

VANS = [imei_for("35630704200000", van) for van in range(1000)]


def fleet_record(n: int, start: datetime) -> TrackedPosition:
    """Record ``n`` of 1000 vans reporting in turn: a Teltonika fix with the fields enrichment fills."""
    van = n % 1000
    fix = start + timedelta(seconds=n // 1000)  # whole seconds, as Teltonika devices stamp them
    return TrackedPosition(
        record_id(VANS[van], fix, "position"), "position", VANS[van], f"van-{van:04d}", COMPANY, f"Van {van}",
        "teltonika", fix, fix + timedelta(microseconds=850_123), round(54.6872 + (n % 997) * 1e-5, 7),
        round(25.2797 - (n % 991) * 1e-5, 7), 47.0 + n % 40, (n * 7) % 360, 11, True, True, 142, True,
        183_402_117 + n, 13.84, 4.09, 4, None, (), (), {239: 1, 240: 1, 21: 4, 66: 13840, 16: 183402117},
    )  # fmt: skip


# --------------------------------------------------------------------------
# Children (bench/wsclient.py has the client side and the plumbing).


def child_main(args: argparse.Namespace) -> None:
    die_with_parent()
    import uvloop

    uvloop.install()
    if args.child == "clients":
        asyncio.run(clients_main())
    elif args.child == "publish-http":
        asyncio.run(publisher_main(json.loads(args.spec)))
    else:
        asyncio.run((_simulate if args.child == "simulate" else _serve)(args))


class RelayTarget:
    """The real relay, as ``fleetgate run`` builds it (no gateway: this process publishes onto the bus).

    ``flush_interval_ms`` None keeps the configured default; 0 writes at the end of every event-loop turn.
    ``pusher``: with the bench's Pusher app (explicit secret) and the REST service (its HTTP API).
    """

    def __init__(self, flush_interval_ms: float | None = None, *, pusher: bool = False) -> None:
        self.flush_interval_ms = flush_interval_ms
        self.pusher = pusher

    async def start(self, work: Path) -> None:
        from gateway.bus.memory import MemoryBus
        from gateway.settings import BusSettings, StateSettings
        from gateway.state.sqlite import SqliteStateStore
        from relay.control import open_control
        from relay.service import Relay
        from relay.settings import AuthSettings, PusherAppSettings, PusherSettings, RelaySettings

        overrides: dict[str, Any] = {"host": "127.0.0.1", "ws_port": 0, "rest_port": 0}
        overrides["max_connections_per_company"] = 1_000_000
        if self.flush_interval_ms is not None:
            overrides["flush_interval_ms"] = self.flush_interval_ms
        settings = msgspec.convert(overrides, RelaySettings)
        app = PusherAppSettings(id=PUSHER_APP_ID, key=PUSHER_KEY, secret=PUSHER_SECRET, max_connections=1_000_000)
        self.bus = MemoryBus(BusSettings())
        self.store = SqliteStateStore(StateSettings(sqlite_path=str(work / "relay.sqlite")))
        control = open_control("memory", "", "fleetgate")
        self.relay = Relay(
            settings, AuthSettings(secret=SECRET), self.bus, self.store, control,
            rest=self.pusher, pusher=PusherSettings(apps=[app]) if self.pusher else None,
        )  # fmt: skip
        await self.relay.start()
        await self.relay.feed_ready.wait()
        self.port = self.relay.ws_port

    def hello(self) -> dict[str, Any]:
        if not self.pusher:
            return {"port": self.port}
        window = self.relay.pusher_settings.batch_window_ms
        return {"port": self.port, "rest_port": self.relay.rest_port, "batch_window_ms": window}

    async def publish(self, batch: Sequence[TrackedPosition]) -> None:
        await self.bus.publish(batch)

    async def trigger(self) -> None:
        """One event as the HTTP API triggers it, without the HTTP request."""
        assert self.relay.pusher is not None
        await self.relay.pusher.trigger(PUSHER_APP_ID, [PUSHER_CHANNEL], PUSHER_EVENT, PUSHER_EVENT_DATA)

    def stats(self) -> dict[str, Any]:
        from gateway.metrics import REGISTRY

        assert self.relay.ws is not None
        protocol = "pusher" if self.pusher else "native"
        slow = REGISTRY.get_sample_value("fleetgate_slow_consumer_disconnects_total", {"protocol": protocol})
        return {"connections": len(self.relay.ws.connections), "slow_consumer_disconnects": slow or 0}

    async def stop(self) -> None:
        await self.relay.stop(0.5)
        await self.bus.close()
        await self.store.close()


class WebsocketsTarget:
    """The reference: ``websockets.asyncio.server.serve`` and ``websockets.broadcast`` once per record.

    It answers ``auth`` without checking the token and adds the socket to the subscribers on ``subscribe``."""

    async def start(self, work: Path) -> None:
        from websockets.asyncio.server import ServerConnection, serve
        from websockets.exceptions import ConnectionClosed

        self.subscribers: set[ServerConnection] = set()
        action = msgspec.json.Decoder(dict[str, Any]).decode

        async def handler(ws: ServerConnection) -> None:
            try:
                async for message in ws:
                    kind = action(message).get("action")
                    if kind == "auth":
                        await ws.send('{"type":"authenticated"}')
                    elif kind == "subscribe":
                        self.subscribers.add(ws)
                        await ws.send('{"type":"subscribed","all":true}')
            except ConnectionClosed:  # the bench's clients abort their sockets
                pass
            finally:
                self.subscribers.discard(ws)

        self.server = await serve(handler, "127.0.0.1", 0, compression=None, max_size=16 * 1024, backlog=4096)
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    def hello(self) -> dict[str, Any]:
        return {"port": self.port}

    async def publish(self, batch: Sequence[TrackedPosition]) -> None:
        from websockets.asyncio.server import broadcast

        for record in batch:
            broadcast(self.subscribers, _encode(native_location(record)), text=True)

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self.server.connections)}

    async def stop(self) -> None:
        self.server.close()


class WebsocketsPusherTarget(WebsocketsTarget):
    """The Pusher reference: ``serve()`` speaking just enough Pusher (``connection_established``, a signed
    ``pusher:subscribe`` checked as the relay checks it, ``pusher:ping``), and ``websockets.broadcast`` once
    per event frame. Records: batched per ``[pusher] batch_window_ms`` into the relay's ``location.updated``
    frames (``relay.pusher_channels``); triggered events: one broadcast each, encoded once."""

    async def start(self, work: Path) -> None:
        import secrets

        from websockets.asyncio.server import ServerConnection, serve
        from websockets.exceptions import ConnectionClosed

        from relay import pusher_channels as wire
        from relay.settings import PusherSettings

        settings = PusherSettings()
        self.window_s, self.max_message = settings.batch_window_ms / 1000, settings.max_message
        self.items: list[bytes] = []
        self.subscribers: set[ServerConnection] = set()

        async def handler(ws: ServerConnection) -> None:
            socket_id = f"{secrets.randbelow(10**10)}.{secrets.randbelow(10**10)}"
            try:
                await ws.send(wire.connection_established(socket_id, settings.activity_timeout_s).decode())
                async for message in ws:
                    request = wire.decode_message(message)
                    if request.event == "pusher:subscribe":
                        subscribe = wire.decode_subscribe(request.data)
                        try:
                            wire.authorise(subscribe, PUSHER_KEY, PUSHER_SECRET, socket_id)
                        except wire.SubscriptionRefused as refused:
                            error = wire.subscription_error(subscribe.channel, refused.kind, refused.message, 401)
                            await ws.send(error.decode())
                            continue
                        self.subscribers.add(ws)
                        await ws.send(wire.subscription_succeeded(subscribe.channel).decode())
                    elif request.event == "pusher:ping":
                        await ws.send(wire.PONG.decode())
            except ConnectionClosed:
                pass
            finally:
                self.subscribers.discard(ws)

        self.server = await serve(handler, "127.0.0.1", 0, compression=None, max_size=16 * 1024, backlog=4096)
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    async def publish(self, batch: Sequence[TrackedPosition]) -> None:
        from relay.pusher_channels import location_update

        if not self.items:
            asyncio.get_running_loop().call_later(self.window_s, self._flush)
        self.items += [location_update(record) for record in batch]

    def _flush(self) -> None:
        from websockets.asyncio.server import broadcast

        from relay.pusher_channels import LOCATION_EVENT, as_json_string, batch_payloads, channel_event

        items, self.items = self.items, []
        for data in batch_payloads(items, self.max_message):
            broadcast(self.subscribers, channel_event(LOCATION_EVENT, PUSHER_CHANNEL, as_json_string(data)), text=True)

    async def trigger(self) -> None:
        from websockets.asyncio.server import broadcast

        from relay.pusher_channels import as_json_string, channel_event

        frame = channel_event(PUSHER_EVENT, PUSHER_CHANNEL, as_json_string(PUSHER_EVENT_DATA.encode()))
        broadcast(self.subscribers, frame, text=True)


class SystemTarget:
    """``fleetgate run``: gateway and relay in this loop on one MemoryBus and SQLite store."""

    async def start(self, work: Path, devices: int) -> None:
        from gateway.bus.memory import MemoryBus
        from gateway.records import Device
        from gateway.service import Gateway
        from gateway.settings import GatewaySettings
        from gateway.state.sqlite import SqliteStateStore
        from relay.control import open_control
        from relay.service import Relay
        from relay.settings import AuthSettings, RelaySettings

        settings = msgspec.convert(
            {"listeners": {"host": "127.0.0.1", "teltonika_port": 0, "gt06": False, "teltonika_udp": False},
             "state": {"sqlite_path": str(work / "system.sqlite")}},
            GatewaySettings,
        )  # fmt: skip
        self.store = SqliteStateStore(settings.state)
        for i in range(devices):  # registered beforehand, as in production
            company, asset = fleet_of(i)
            imei = imei_for(DEFAULT_IMEI_BASE, i)
            await self.store.put_device(Device(imei=imei, asset_id=asset, company_id=company, display_name=asset))
        self.bus = MemoryBus(settings.bus)
        self.gateway = Gateway(settings, self.bus, self.store)
        await self.gateway.start()
        relay_settings = msgspec.convert({"host": "127.0.0.1", "ws_port": 0, "rest_port": 0}, RelaySettings)
        control = open_control("memory", "", "fleetgate")
        self.relay = Relay(relay_settings, AuthSettings(secret=SECRET), self.bus, self.store, control, rest=False)
        await self.relay.start()
        await self.relay.feed_ready.wait()
        self.port = self.relay.ws_port
        self.device_port = self.gateway.port("teltonika")

    async def stop(self) -> None:
        await self.relay.stop(0.5)
        await self.gateway.stop(2.0)
        await self.bus.close()
        await self.store.close()


SERVE_TARGETS: dict[str, Any] = {
    "serve-relay": RelayTarget,
    "serve-relay-turn": lambda: RelayTarget(flush_interval_ms=0),
    "serve-websockets": WebsocketsTarget,
    "serve-pusher-relay": lambda: RelayTarget(pusher=True),
    "serve-pusher-websockets": WebsocketsPusherTarget,
}


async def _serve(args: argparse.Namespace) -> None:
    from gateway.service import tune_gc

    work = Path(args.workdir)
    target: Any
    if args.child == "serve-system":
        target = SystemTarget()
        await target.start(work, args.devices)
        say({"pid": os.getpid(), "port": target.port, "device_port": target.device_port})
    else:
        target = SERVE_TARGETS[args.child]()
        await target.start(work)
        tune_gc()  # as Gateway.start does in `fleetgate run`; the same for the reference
        say({"pid": os.getpid(), **target.hello()})
    start = datetime.now(UTC) - timedelta(hours=1)
    pool = [fleet_record(n, start) for n in range(POOL if args.child != "serve-system" else 0)]
    rounds: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def publisher() -> None:
        """Each round: records in batches of ``batch``, one batch per event-loop turn; or events, one per turn."""
        taken = 0
        while True:
            command = await rounds.get()
            count, batch = command["count"], command.get("batch", 1)
            if command.get("kind") == "events":
                for _ in range(count):
                    await target.trigger()
                    await asyncio.sleep(0)
                continue
            for i in range(0, count, batch):
                n = min(batch, count - i)
                while taken + n > len(pool):
                    pool.append(fleet_record(len(pool), start))
                await target.publish(pool[taken : taken + n])
                taken += n
                await asyncio.sleep(0)

    task = asyncio.create_task(publisher())
    queue = commands()
    while (command := await queue.get()) is not None:
        if command["cmd"] == "publish":
            rounds.put_nowait(command)
        elif command["cmd"] == "stats":
            say(target.stats())
    task.cancel()
    await target.stop()


async def _simulate(args: argparse.Namespace) -> None:
    from gateway.simulator import Simulation

    sim = Simulation(
        "teltonika", args.devices, port=args.port, interval=1.0, records_per_packet=1, imei_base=DEFAULT_IMEI_BASE,
        ack_timeout=10.0, record_latency=True,
    )  # fmt: skip
    run = asyncio.create_task(sim.run())
    say({"pid": os.getpid()})
    queue = commands()
    acked = 0
    while (command := await queue.get()) is not None:
        if command["cmd"] == "window":
            sim.stats.latencies.clear()
            acked = sim.stats.records_acked
        elif command["cmd"] == "end":
            acks = sorted(sim.stats.latencies)
            say({"acked": sim.stats.records_acked - acked, "connected": sim.stats.connected,
                 "reconnects": sim.stats.reconnects, "rejected": sim.stats.rejected,
                 "ack_p50_ms": ms(acks, 0.5), "ack_p99_ms": ms(acks, 0.99)})  # fmt: skip
    sim.abort()
    await run


# --------------------------------------------------------------------------
# The parent.


async def fanout_run(
    server: Child, clients: Sequence[Child], subscribers: int, batch: int, seconds: float, round_deliveries: int
) -> dict[str, Any]:
    """After a warm-up batch, publish rounds of records until ``seconds`` are (about to be) over."""
    window = batch * max(1, round(min(ROUND_RECORDS_MAX, round_deliveries / subscribers) / batch))
    run = await rounds_run(server, {"server": [server.pid]}, clients, subscribers, window, batch, seconds, batch=batch)
    deliveries, wall = run["deliveries"], run["wall"]
    return {
        "records_per_round": window,
        "records": run["units"],
        "deliveries": deliveries,
        "seconds": round(wall, 3),
        "deliveries_per_s": round(deliveries / wall),
        "cpu_us_per_delivery": round(run["server_cpu"] * 1e6 / deliveries, 3),
        "cpu_cores": run["cpu_cores"],
    }


async def fanout_target(
    target: str, subscribers: int, clients: Sequence[Child], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One fresh server: idle RSS of ``subscribers`` connections, then a fan-out run per batch size."""
    server, hello = await Child.start("--child", f"serve-{target}", "--workdir", str(work))
    try:
        await connect(clients, 10_000_000, WARM_CONNECTIONS, port=hello["port"])  # lazy imports, caches
        await close(clients)
        await asyncio.sleep(0.3)
        before = rss_bytes(server.pid)
        connect_s = await connect(clients, 0, subscribers, port=hello["port"])
        progress(f"{target}: {subscribers} subscribers connected in {connect_s:.1f} s")
        await asyncio.sleep(0.3)
        after = rss_bytes(server.pid)
        out: dict[str, Any] = {
            "connect_seconds": round(connect_s, 2),
            "rss_before_kib": before // 1024,
            "rss_after_kib": after // 1024,
            "idle_rss_kib_per_subscriber": round((after - before) / 1024 / subscribers, 2),
        }
        for batch in args.batches:
            run = await fanout_run(server, clients, subscribers, batch, args.seconds, args.round_deliveries)
            out[f"batch_{batch}"] = run
            progress(f"{target}: batch {batch}: {run['deliveries_per_s']:,} deliveries/s, "
                     f"{run['cpu_us_per_delivery']} us CPU each")  # fmt: skip
        out["server"] = await server.ask(cmd="stats")
        return out
    finally:
        with contextlib.suppress(Exception):
            await close(clients)
        await server.stop()


# --- the Pusher runs ------------------------------------------------------------------------------------


def pusher_spec(port: int) -> dict[str, Any]:
    """The ``connect`` command's part for Pusher subscribers."""
    subscribe = {"key": PUSHER_KEY, "secret": PUSHER_SECRET, "channel": PUSHER_CHANNEL, "event": PUSHER_EVENT}
    return {"port": port, "pusher": subscribe}


def records_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A ``records`` run: units are records inside ``location.updated`` events (frames)."""
    deliveries, frames, wall, cpu = run["deliveries"], run["frames"], run["wall"], run["server_cpu"]
    return {
        "records_per_round": run["window"],
        "records": run["units"],
        "deliveries": deliveries,
        "event_frames": frames,
        "records_per_event": round(deliveries / frames, 1),
        "seconds": round(wall, 3),
        "deliveries_per_s": round(deliveries / wall),
        "events_per_s": round(frames / wall),
        "cpu_us_per_delivery": round(cpu * 1e6 / deliveries, 3),
        "cpu_us_per_event_frame": round(cpu * 1e6 / frames, 3),
        "cpu_cores": run["cpu_cores"],
    }


def events_figures(run: dict[str, Any], publisher: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``events`` run: units are events, one frame each; a delivery is one event to one subscriber."""
    deliveries, wall, cpu = run["deliveries"], run["wall"], run["server_cpu"]
    out = {
        "events_per_round": run["window"],
        "events": run["units"],
        "deliveries": deliveries,
        "seconds": round(wall, 3),
        "events_per_s": round(run["units"] / wall),
        "deliveries_per_s": round(deliveries / wall),
        "cpu_us_per_delivery": round(cpu * 1e6 / deliveries, 3),
        "cpu_us_per_event": round(cpu * 1e6 / run["units"], 1),
        "cpu_cores": run["cpu_cores"],
    }
    if publisher is not None:
        out["publisher"] = publisher
    return out


def http_parser() -> str:
    """What uvicorn (``http="auto"``) parses HTTP/1.1 with in the relay process."""
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {k: round(a[k] / b[k], 3) for k in ("cpu_us_per_delivery", "deliveries_per_s")}


async def http_run(
    port: int, servers: dict[str, list[int]], clients: Sequence[Child], n: int, window: int, seconds: float
) -> dict[str, Any]:
    """Events through the HTTP API of the server on ``port``, posted by a publisher process."""
    spec = {"port": port, "app_id": PUSHER_APP_ID, "key": PUSHER_KEY, "secret": PUSHER_SECRET,
            "channel": PUSHER_CHANNEL, "event": PUSHER_EVENT, "data": PUSHER_EVENT_DATA,
            "connections": HTTP_CONNECTIONS}  # fmt: skip
    publisher, _ = await Child.start("--child", "publish-http", "--spec", json.dumps(spec))
    try:
        run = await rounds_run(publisher, servers, clients, n, window, PUSHER_WARM_EVENTS, seconds)
        stats = await publisher.ask(cmd="stats")
    finally:
        await publisher.stop()
    return events_figures(run, {"connections": HTTP_CONNECTIONS, **stats})


async def pusher_relay(args: argparse.Namespace, clients: Sequence[Child], work: Path, window: int) -> dict[str, Any]:
    """The relay: records through the bus, events triggered in-process, events through the HTTP API."""
    n = args.pusher_subscribers
    server, hello = await Child.start("--child", "serve-pusher-relay", "--workdir", str(work))
    servers = {"server": [server.pid]}
    try:
        connect_s = await connect(clients, 0, n, **pusher_spec(hello["port"]))
        progress(f"pusher relay: {n} subscribers connected in {connect_s:.1f} s")
        records = records_figures(await rounds_run(
            server, servers, clients, n, PUSHER_RECORDS_PER_ROUND, PUSHER_PUBLISH_BATCH, args.seconds,
            batch=PUSHER_PUBLISH_BATCH,
        ))  # fmt: skip
        progress(f"pusher relay: records: {records['deliveries_per_s']:,} record deliveries/s, "
                 f"{records['cpu_us_per_delivery']} us CPU each")  # fmt: skip
        internal = events_figures(
            await rounds_run(server, servers, clients, n, window, PUSHER_WARM_EVENTS, args.seconds, kind="events")
        )
        http = await http_run(hello["rest_port"], servers, clients, n, window, args.seconds)
        progress(f"pusher relay: HTTP API: {http['deliveries_per_s']:,} deliveries/s, "
                 f"{http['cpu_us_per_delivery']} us CPU each")  # fmt: skip
        stats = await server.ask(cmd="stats")
    finally:
        with contextlib.suppress(Exception):
            await close(clients)
        await server.stop()
    return {"batch_window_ms": hello["batch_window_ms"], "connect_seconds": round(connect_s, 2),
            "records": records, "internal": internal, "http": http, "server": stats}  # fmt: skip


async def pusher_reference(
    args: argparse.Namespace, clients: Sequence[Child], work: Path, window: int
) -> dict[str, Any]:
    """websockets.broadcast: the same record frames and the same events (in-process, no HTTP)."""
    n = args.pusher_subscribers
    server, hello = await Child.start("--child", "serve-pusher-websockets", "--workdir", str(work))
    servers = {"server": [server.pid]}
    try:
        await connect(clients, 0, n, **pusher_spec(hello["port"]))
        records = records_figures(await rounds_run(
            server, servers, clients, n, PUSHER_RECORDS_PER_ROUND, PUSHER_PUBLISH_BATCH, args.seconds,
            batch=PUSHER_PUBLISH_BATCH,
        ))  # fmt: skip
        events = events_figures(
            await rounds_run(server, servers, clients, n, window, PUSHER_WARM_EVENTS, args.seconds, kind="events")
        )
        progress(f"pusher websockets.broadcast: records {records['deliveries_per_s']:,}/s, "
                 f"events {events['deliveries_per_s']:,} deliveries/s")  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            await close(clients)
        await server.stop()
    return {"records": records, "events": events}


async def pusher_soketi(args: argparse.Namespace, clients: Sequence[Child], work: Path, window: int) -> dict[str, Any]:
    """soketi under the HTTP API load of the relay's ``http`` run; ``skipped`` says why when it cannot run."""
    if args.no_soketi:
        return {"skipped": "--no-soketi"}
    peer = SoketiPeer(work, PUSHER_APP_ID, PUSHER_KEY, PUSHER_SECRET)
    problem = await peer.install()
    if problem is not None:
        progress(f"soketi: skipped: {problem}")
        return {"skipped": problem}
    n = args.pusher_subscribers
    try:
        await peer.start()
        connect_s = await connect(clients, 0, n, **pusher_spec(peer.port))
        progress(f"soketi: {n} subscribers connected in {connect_s:.1f} s")
        http = await http_run(peer.port, {"server": peer.pids()}, clients, n, window, args.seconds)
        progress(f"soketi: HTTP API: {http['deliveries_per_s']:,} deliveries/s, "
                 f"{http['cpu_us_per_delivery']} us CPU each")  # fmt: skip
    except (OSError, RuntimeError, TimeoutError) as exc:
        progress(f"soketi: skipped: {exc}")
        return {"skipped": f"{type(exc).__name__}: {exc}", **peer.versions}
    finally:
        with contextlib.suppress(Exception):
            await close(clients)
        await peer.stop()
    return {**peer.versions, "connect_seconds": round(connect_s, 2), "http": http}


async def pusher_bench(args: argparse.Namespace, clients: Sequence[Child], work: Path) -> dict[str, Any]:
    n = args.pusher_subscribers
    window = max(1, min(ROUND_RECORDS_MAX, round(args.round_deliveries / n)))
    relay = await pusher_relay(args, clients, work, window)
    reference = await pusher_reference(args, clients, work, window)
    soketi = await pusher_soketi(args, clients, work, window)
    events: dict[str, Any] = {
        "data_bytes": len(PUSHER_EVENT_DATA),
        "relay_http": relay["http"],
        "relay_internal": relay["internal"],
        "websockets_broadcast": reference["events"],
        "soketi_http": soketi.get("http", {"skipped": soketi.get("skipped")}),
        "ratio": {"relay_http/websockets_broadcast": ratio(relay["http"], reference["events"]),
                  "relay_internal/websockets_broadcast": ratio(relay["internal"], reference["events"])},
    }  # fmt: skip
    if "http" in soketi:
        events["ratio"]["relay_http/soketi_http"] = ratio(relay["http"], soketi["http"])
    return {
        "subscribers": n,
        "channel": PUSHER_CHANNEL,
        "batch_window_ms": relay["batch_window_ms"],
        "records": {
            "publish_batch": PUSHER_PUBLISH_BATCH,
            "relay": relay["records"],
            "websockets_broadcast": reference["records"],
            "ratio": ratio(relay["records"], reference["records"]),
        },
        "events": events,
        "soketi": {k: v for k, v in soketi.items() if k != "http"},
        "relay_server": {"connect_seconds": relay["connect_seconds"], "http_parser": http_parser(), **relay["server"]},
        "notes": PUSHER_NOTES,
    }


async def latency(args: argparse.Namespace, clients: Sequence[Child], work: Path) -> dict[str, Any]:
    devices, subscribers = args.latency_devices, args.latency_subscribers
    server, hello = await Child.start("--child", "serve-system", "--workdir", str(work), "--devices", str(devices))
    sim: Child | None = None
    try:
        await connect(clients, 0, subscribers, port=hello["port"], devices=devices)
        progress(f"latency: {subscribers} subscribers connected; starting {devices} devices")
        sim, _ = await Child.start("--child", "simulate", "--port", str(hello["device_port"]),
                                   "--devices", str(devices))  # fmt: skip
        await asyncio.sleep(args.latency_warmup)
        pids = {"server": server.pid, "simulator": sim.pid, **{f"client{i}": c.pid for i, c in enumerate(clients)}}
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for c in (*clients, sim):
            c.send(cmd="window")
        started = time.perf_counter()
        await asyncio.sleep(args.latency_seconds)
        wall = time.perf_counter() - started
        cores = {name: round((cpu_seconds(pid) - cpu[name]) / wall, 2) for name, pid in pids.items()}
        files = [work / f"latency-{i}.f64" for i in range(len(clients))]
        ends = await asyncio.gather(*(c.ask(cmd="end", file=str(f)) for c, f in zip(clients, files, strict=True)))
        device_side = await sim.ask(cmd="end")
        progress(f"latency: {sum(e['samples'] for e in ends):,} samples")
        lost = [why for c in clients for why in c.lost]
    finally:
        if sim is not None:
            await sim.stop()
        with contextlib.suppress(Exception):
            await close(clients)
        await server.stop()
    samples = array("d")
    for f in files:
        samples.frombytes(f.read_bytes())
    ordered = sorted(samples)
    companies = max(1, -(-devices // DEVICES_PER_COMPANY))
    return {
        "devices": devices,
        "subscribers": subscribers,
        "subscriptions": f"{companies} companies of up to {DEVICES_PER_COMPANY} devices; per company 1 in "
        f"{ALL_SHARE} subscribers watches `all`, each other one asset (driver_id)",
        "rate_per_device_hz": 1,
        "records_per_packet": 1,
        "seconds": round(wall, 2),
        "records_per_s": round(device_side["acked"] / wall),
        "deliveries_per_s": round(sum(e["frames"] for e in ends) / wall),
        "p50_ms": ms(ordered, 0.5),
        "p90_ms": ms(ordered, 0.9),
        "p99_ms": ms(ordered, 0.99),
        "max_ms": ms(ordered, 1.0),
        "samples": len(ordered),
        "measured_from": "received_at",
        "measured_from_why": "the simulator's fix_time is start + k s (whole seconds, devices ramped over 1 s), "
        "not its send time; received_at is when the gateway read the packet, so this is gateway decode + commit "
        "+ bus + relay fan-out + loopback, without the device -> gateway hop (see device_ack_* for that side)",
        "device_ack_p50_ms": device_side["ack_p50_ms"],
        "device_ack_p99_ms": device_side["ack_p99_ms"],
        "device_reconnects": device_side["reconnects"],
        "subscribers_lost": len(lost),
        "cpu_cores": cores,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    record = fleet_record(0, datetime.now(UTC))
    out: dict[str, Any] = {
        "bench": "fanout",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loop": "uvloop",
            "uvloop": version("uvloop"),
            "websockets": version("websockets"),
        },
        "payload_bytes": len(_encode(native_location(record))),
        "notes": NOTES,
        "fanout": [],
    }
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)  # the clean-up of Ctrl-C
    clients = [(await Child.start("--child", "clients"))[0] for _ in range(args.client_processes)]
    try:
        with tempfile.TemporaryDirectory(prefix="fleetgate-fanout-") as tmp:
            work = Path(tmp)
            rss: dict[str, Any] = {}
            for n in args.subscribers:
                runs = {t: await fanout_target(t, n, clients, work, args) for t in TARGETS}
                for batch in args.batches:
                    relay, turn, ws = (runs[t][f"batch_{batch}"] for t in TARGETS)
                    out["fanout"].append({
                        "subscribers": n, "batch": batch,
                        "relay": relay, "relay_flush_each_turn": turn, "websockets_broadcast": ws,
                        "ratio": ratio(relay, ws), "ratio_flush_each_turn": ratio(turn, ws),
                    })  # fmt: skip
                rss = {"subscribers": n, **{TARGETS[t]: runs[t]["idle_rss_kib_per_subscriber"] for t in TARGETS},
                       "detail": {TARGETS[t]: {k: runs[t][k] for k in ("rss_before_kib", "rss_after_kib",
                                                                       "connect_seconds", "server")}
                                  for t in TARGETS}}  # fmt: skip
            if rss:
                out["idle_rss_kib_per_subscriber"] = rss
            if args.pusher_subscribers > 0:
                out["pusher"] = await pusher_bench(args, clients, work)
            if args.latency_seconds > 0:
                out["latency"] = await latency(args, clients, work)
    finally:
        for c in clients:
            await c.stop()
    return out


# "relay": default settings (fan-out writes flushed every flush_interval_ms); "relay-turn": flushed every loop turn.
TARGETS = {"relay": "relay", "relay-turn": "relay_flush_each_turn", "websockets": "websockets_serve"}
NOTES = [
    "fanout: N subscribers on one company (the relay's per-company connection limit raised to allow it); "
    "cpu_us_per_delivery = server process CPU (user + sys, all threads) / frames delivered; ratio = relay / "
    "websockets_broadcast",
    "relay: Relay + MemoryBus + SQLite store, records published onto the bus, `batch` records per event-loop turn",
    "websockets_broadcast: serve(compression=None) + broadcast(subscribers, json_bytes, text=True) per record; "
    "it answers auth without verifying the token",
    "both servers: uvloop, gateway.service.tune_gc() as in `fleetgate run`; clients: 2 processes, raw RFC 6455",
]
PUSHER_NOTES = [
    "subscribers: raw Pusher protocol 7 clients on /app/{key}, each signing its pusher:subscribe with the app "
    "secret (channel_auth), as an auth endpoint would; all servers verify the signature",
    "records: records published onto the relay's bus (publish_batch per event-loop turn) and batched per "
    "batch_window_ms into location.updated events (data: a JSON string, one object or an array split at "
    "[pusher] max_message); deliveries = records received, cpu_us_per_delivery = server CPU / records "
    "received, cpu_us_per_event_frame = server CPU / event frames received; websockets_broadcast batches the "
    "same records into the same frames (relay.pusher_channels) and broadcasts each frame once",
    "records rounds: a round completes only after the batch window fires, and at most 3 rounds are in flight "
    "(bounded buffers), so deliveries_per_s is a closed-loop figure: idle time between windows lowers it, "
    "not the CPU per delivery",
    "events: one delivery = one event frame to one subscriber; cpu_us_per_event = server CPU per event "
    "published (all its deliveries, plus for *_http the HTTP request); relay_http and soketi_http: a publisher "
    "process POSTs signed /apps/{id}/events over HTTP/1.1 (HTTP_CONNECTIONS in parallel), so both include HTTP "
    "parsing, signature and body_md5 checks; relay_internal and websockets_broadcast generate the events in "
    "the server process (no HTTP), one per event-loop turn",
    "relay_http - relay_internal: the HTTP request (uvicorn with relay_server.http_parser, Litestar, checks) "
    "plus fewer frames per write: at the HTTP pace fewer events fall in one flush_interval_ms window",
    "relay: Relay with its REST service (uvicorn, in the same process and event loop) and MemoryControl",
    "soketi: one node process (uWebSockets.js: HTTP, WebSocket framing and writes in C++ on libuv; the Pusher "
    "logic in JS), CPU from /proc of its process tree, local adapter (no Redis); it answers every HTTP API "
    "request with Connection: close, so the publisher connects once per event (publisher.reconnects); per "
    "subscriber and event it JSON.parses the message, JSON.stringifies it again and re-arms a 120 s timer "
    "(local-adapter.js send, ws-handler.js sendJson)",
    "on this machine clients, publisher and server share the CPUs (cpu_cores): deliveries_per_s is bounded by "
    "the machine, cpu_us_per_delivery much less so",
]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--subscribers", type=ints, default=[1000, 10_000], help="fan-out sizes (default 1000,10000; '' skips fan-out)"
    )
    parser.add_argument("--batches", type=ints, default=[1, 20], help="records per event-loop turn (default 1,20)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured fan-out per size and batch (default 3)")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument(
        "--round-deliveries",
        type=int,
        default=50_000,
        help="frames per round (records per round = this / subscribers; default 50000)",
    )
    parser.add_argument(
        "--pusher-subscribers", type=int, default=1000, help="Pusher-protocol subscribers (default 1000; 0 skips)"
    )
    parser.add_argument("--no-soketi", action="store_true", help="skip the soketi run of the Pusher part")
    parser.add_argument("--latency-devices", type=int, default=2000)
    parser.add_argument("--latency-subscribers", type=int, default=2000)
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="0: skip the latency run (default 20)")
    parser.add_argument("--latency-warmup", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="CI smoke size: 200,1000 subscribers, short windows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.subscribers, args.seconds, args.round_deliveries = [200, 1000], 0.5, 10_000
        args.pusher_subscribers = min(args.pusher_subscribers, 200)
        args.latency_devices = args.latency_subscribers = 200
        args.latency_seconds, args.latency_warmup = 2.0, 1.5
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:  # children inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    need = max([*args.subscribers, args.pusher_subscribers, args.latency_subscribers + args.latency_devices]) + 256
    if want < need:
        parser.error(f"the file-descriptor limit ({want}) is below the {need} sockets a server needs")
    try:
        result = asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("fanout: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for child in Child.live:  # what bench() could not stop
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        for proc, group in SoketiPeer.live:  # soketi, or npm ci and what it started
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
