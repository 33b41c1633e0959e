"""Relay fan-out over loopback, printed as one JSON object.

Every server runs in a *child process* (uvloop, compression off, the GC tuned
as ``fleetgate run`` tunes it); subscribers live in two client processes that
speak just enough RFC 6455 (handshake, masked client frames, pong) to stay
cheap, and count or time the frames they read.

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
* ``latency``: ``fleetgate run`` wiring in one child (Gateway + Relay on one
  MemoryBus and SQLite store, devices registered first), simulated Teltonika
  devices (``gateway.simulator``, own process) sending one record per packet
  every second, and office subscribers (companies of 100 devices; per company
  10 % of the subscribers watch ``all``, the others one asset each). Latency =
  client receive time - the record's ``received_at`` (gateway read time; the
  simulator's ``fix_time`` is on a whole-second grid, not the send time).

    python bench/fanout.py [--subscribers 1000,10000] [--batches 1,20] [--seconds 3]
                           [--latency-devices 2000] [--latency-subscribers 2000] [--latency-seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import resource
import signal
import struct
import sys
import tempfile
import time
from array import array
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "codecs"), str(ROOT)]

import msgspec  # noqa: E402

from gateway.records import TrackedPosition, record_id  # noqa: E402
from gateway.simulator import DEFAULT_IMEI_BASE, imei_for  # noqa: E402
from relay.native import native_location  # noqa: E402

SECRET = "fanout-bench-secret-of-at-least-32-bytes"
COMPANY = "acme"
DEVICES_PER_COMPANY = 100
ALL_SHARE = 10  # latency run: one subscriber in ALL_SHARE of a company watches all of it
INFLIGHT_ROUNDS = 3
ROUND_RECORDS_MAX = 200  # with INFLIGHT_ROUNDS, at most ~200 KB queued toward a socket (the relay drops at 1 MiB)
WARM_CONNECTIONS = 40
POOL = 30_000  # records built before the server reports ready (more are built on demand, inside the window)
LOCATION = b'{"type":"location"'
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_encode = msgspec.json.Encoder().encode


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
# Children: print one JSON line {"pid", ...}, then obey JSON commands on stdin.


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _commands() -> asyncio.Queue[dict[str, Any] | None]:
    """Command lines from stdin; None at end of input (the parent closed it or died)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    partial = b""

    def readable() -> None:
        nonlocal partial
        chunk = os.read(0, 65536)
        if not chunk:
            loop.remove_reader(0)
            queue.put_nowait(None)
            return
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:
            queue.put_nowait(json.loads(line))

    loop.add_reader(0, readable)
    return queue


def child_main(args: argparse.Namespace) -> None:
    with contextlib.suppress(Exception):  # die with the parent, even if it is SIGKILLed (Linux)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    import uvloop

    uvloop.install()
    main = {"clients": _clients, "simulate": _simulate}.get(args.child, _serve)
    asyncio.run(main(args))


class RelayTarget:
    """The real relay, as ``fleetgate run`` builds it (no gateway: this process publishes onto the bus).

    ``flush_interval_ms`` None keeps the configured default; 0 writes at the end of every event-loop turn.
    """

    def __init__(self, flush_interval_ms: float | None = None) -> None:
        self.flush_interval_ms = flush_interval_ms

    async def start(self, work: Path) -> None:
        from gateway.bus.memory import MemoryBus
        from gateway.settings import BusSettings, StateSettings
        from gateway.state.sqlite import SqliteStateStore
        from relay.control import open_control
        from relay.service import Relay
        from relay.settings import AuthSettings, RelaySettings

        overrides: dict[str, Any] = {"host": "127.0.0.1", "ws_port": 0, "rest_port": 0}
        overrides["max_connections_per_company"] = 1_000_000
        if self.flush_interval_ms is not None:
            overrides["flush_interval_ms"] = self.flush_interval_ms
        settings = msgspec.convert(overrides, RelaySettings)
        self.bus = MemoryBus(BusSettings())
        self.store = SqliteStateStore(StateSettings(sqlite_path=str(work / "relay.sqlite")))
        control = open_control("memory", "", "fleetgate")
        self.relay = Relay(settings, AuthSettings(secret=SECRET), self.bus, self.store, control, rest=False)
        await self.relay.start()
        await self.relay.feed_ready.wait()
        self.port = self.relay.ws_port

    async def publish(self, batch: Sequence[TrackedPosition]) -> None:
        await self.bus.publish(batch)

    def stats(self) -> dict[str, Any]:
        from gateway.metrics import REGISTRY

        assert self.relay.ws is not None
        slow = REGISTRY.get_sample_value("fleetgate_slow_consumer_disconnects_total", {"protocol": "native"})
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

    async def publish(self, batch: Sequence[TrackedPosition]) -> None:
        from websockets.asyncio.server import broadcast

        for record in batch:
            broadcast(self.subscribers, _encode(native_location(record)), text=True)

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self.server.connections)}

    async def stop(self) -> None:
        self.server.close()


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


def fleet_of(device: int) -> tuple[str, str]:
    """(company, asset) of simulated device ``device`` in the latency run."""
    return f"fleet-{device // DEVICES_PER_COMPANY:03d}", f"truck-{device:05d}"


async def _serve(args: argparse.Namespace) -> None:
    from gateway.service import tune_gc

    work = Path(args.workdir)
    target: Any
    if args.child == "serve-system":
        target = SystemTarget()
        await target.start(work, args.devices)
        _say({"pid": os.getpid(), "port": target.port, "device_port": target.device_port})
    else:
        target = {
            "serve-relay": RelayTarget,
            "serve-relay-turn": lambda: RelayTarget(flush_interval_ms=0),
            "serve-websockets": WebsocketsTarget,
        }[args.child]()
        await target.start(work)
        tune_gc()  # as Gateway.start does in `fleetgate run`; the same for the reference
        _say({"pid": os.getpid(), "port": target.port})
    start = datetime.now(UTC) - timedelta(hours=1)
    pool = [fleet_record(n, start) for n in range(POOL if args.child != "serve-system" else 0)]
    rounds: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    async def publisher() -> None:
        """Each round: its records in batches of ``batch``, one batch per event-loop turn."""
        taken = 0
        while True:
            records, batch = await rounds.get()
            for i in range(0, records, batch):
                n = min(batch, records - i)
                while taken + n > len(pool):
                    pool.append(fleet_record(len(pool), start))
                await target.publish(pool[taken : taken + n])
                taken += n
                await asyncio.sleep(0)

    task = asyncio.create_task(publisher())
    commands = _commands()
    while (command := await commands.get()) is not None:
        if command["cmd"] == "publish":
            rounds.put_nowait((command["records"], command["batch"]))
        elif command["cmd"] == "stats":
            _say(target.stats())
    task.cancel()
    await target.stop()


# --- client processes -----------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.2, 5.3)."""
    n = len(payload)
    head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class _Probe(msgspec.Struct):
    received_at: datetime


_decode_probe = msgspec.json.Decoder(_Probe).decode


class Subscriber(asyncio.Protocol):
    """One office socket: handshake, auth, subscribe; then count (and in latency mode, time) location frames."""

    def __init__(self, fleet: Fleet, auth: bytes, subscribe: bytes) -> None:
        self.fleet = fleet
        self.auth = auth
        self.subscribe = subscribe
        self.key = base64.b64encode(os.urandom(16))
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.count = 0
        self.mark = fleet.window
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(  # type: ignore[attr-defined]
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self.key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data, self.buf = self.buf + data, b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
            if not data.startswith(b"HTTP/1.1 101") or accept not in data[:end]:
                self.fail(f"handshake refused: {data[:end].decode(errors='replace')[:200]}")
                return
            self.upgraded = True
            self.write(1, self.auth)
            data = data[end + 4 :]
        pos, size, now = 0, len(data), time.time()
        while pos + 2 <= size:
            length = data[pos + 1]  # a server never masks (RFC 6455 5.1)
            start = pos + 2
            if length >= 126:
                extra = 2 if length == 126 else 8
                if start + extra > size:
                    break
                length, start = int.from_bytes(data[start : start + extra], "big"), start + extra
            end = start + length
            if end > size:
                break
            if data[pos] == 0x81 and data.startswith(LOCATION, start):
                self.count += 1
                if self.fleet.sampling:
                    self.fleet.samples.append(now - _decode_probe(data[start:end]).received_at.timestamp())
                if self.count >= self.mark:
                    self.mark += self.fleet.window
                    self.fleet.reached(self.count // self.fleet.window)
            else:
                self.control(data[pos] & 0x0F, data[start:end])
            pos = end
        if pos < size:
            self.buf = data[pos:]

    def control(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:
            self.write(0xA, payload)
        elif opcode == 0x8:
            self.fail(f"closed by the server: {payload[:2].hex()} {payload[2:].decode(errors='replace')}")
        elif opcode == 0x1:
            kind = json.loads(payload).get("type")
            if kind == "authenticated":
                self.write(1, self.subscribe)
            elif kind == "subscribed" and not self.ready.done():
                self.ready.set_result(None)
            elif kind == "error":
                self.fail(payload.decode())

    def write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        elif not self.closing:
            self.fleet.lost(why)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.fail(f"connection lost: {exc}")


class Fleet:
    """The subscribers of one client process; reports each round once every socket has all its frames."""

    def __init__(self) -> None:
        self.conns: list[Subscriber] = []
        self.window = 1 << 62
        self.levels: defaultdict[int, int] = defaultdict(int)
        self.sampling = False
        self.samples = array("d")
        self.frames_at = 0
        self.lost_reported = 0

    def reached(self, level: int) -> None:
        self.levels[level] += 1
        if self.levels[level] == len(self.conns):
            del self.levels[level]
            _say({"round": level, "t": time.time()})

    def lost(self, why: str) -> None:
        self.lost_reported += 1
        if self.lost_reported <= 3:
            _say({"lost": why})

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        from relay.settings import AuthSettings
        from relay.tokens import mint_token

        auth_settings = AuthSettings(secret=SECRET)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        async def one(g: int) -> Subscriber:
            company, asset = subscription(g, command)
            user = f"office-{g}"
            token = mint_token(auth_settings, role="office", company=company, user=user, ttl_s=3600)
            auth = _encode({"action": "auth", "user_id": user, "role": "office", "token": token})
            subscribe = _encode({"action": "subscribe", **({"driver_id": asset} if asset else {"all": True})})
            source = (f"127.3.{g // 200 % 250}.{1 + g % 200}", 0)  # spread over sources: plenty of ports
            _, conn = await loop.create_connection(
                lambda: Subscriber(self, auth, subscribe), "127.0.0.1", command["port"], local_addr=source
            )
            await asyncio.wait_for(conn.ready, 30.0)
            return conn

        first, count = command["first"], command["count"]
        for chunk in range(first, first + count, 200):
            self.conns += await asyncio.gather(*(one(g) for g in range(chunk, min(first + count, chunk + 200))))
        return {"ready": len(self.conns), "seconds": round(time.perf_counter() - started, 2)}

    def rounds(self, window: int) -> dict[str, Any]:
        """From now on, report round k once every socket has k * ``window`` more location frames."""
        self.window = window
        self.levels.clear()
        for conn in self.conns:
            conn.count, conn.mark = 0, window
        return {"window": window}

    def close(self) -> dict[str, Any]:
        for conn in self.conns:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
        closed, self.conns = len(self.conns), []
        self.sampling = False
        return {"closed": closed}


def subscription(g: int, command: dict[str, Any]) -> tuple[str, str | None]:
    """(company, asset or None for ``all``) of subscriber ``g``: see the module docstring."""
    devices = command.get("devices", 0)
    if not devices:
        return COMPANY, None
    companies = max(1, -(-devices // DEVICES_PER_COMPANY))
    company, j = g % companies, g // companies
    per_company = max(1, command["count_total"] // companies)
    watchers = max(1, per_company // ALL_SHARE)
    if j < watchers:
        return fleet_of(company * DEVICES_PER_COMPANY)[0], None
    in_company = min(DEVICES_PER_COMPANY, devices - company * DEVICES_PER_COMPANY)
    return fleet_of(company * DEVICES_PER_COMPANY + (j - watchers) % in_company)


async def _clients(args: argparse.Namespace) -> None:
    fleet = Fleet()
    _say({"pid": os.getpid()})
    commands = _commands()
    while (command := await commands.get()) is not None:
        if command["cmd"] == "connect":
            try:
                _say(await fleet.connect(command))
            except (OSError, TimeoutError, ConnectionError) as exc:
                _say({"error": f"connect: {type(exc).__name__}: {exc}"})
        elif command["cmd"] == "close":
            _say(fleet.close())
        elif command["cmd"] == "rounds":
            _say(fleet.rounds(command["window"]))
        elif command["cmd"] == "window":
            fleet.samples = array("d")
            fleet.sampling = True
            fleet.frames_at = sum(c.count for c in fleet.conns)
        elif command["cmd"] == "end":
            fleet.sampling = False
            with open(command["file"], "wb") as out:
                fleet.samples.tofile(out)
            frames = sum(c.count for c in fleet.conns) - fleet.frames_at
            _say({"frames": frames, "samples": len(fleet.samples)})
    fleet.close()


async def _simulate(args: argparse.Namespace) -> None:
    from gateway.simulator import Simulation

    sim = Simulation(
        "teltonika", args.devices, port=args.port, interval=1.0, records_per_packet=1, imei_base=DEFAULT_IMEI_BASE,
        ack_timeout=10.0, record_latency=True,
    )  # fmt: skip
    run = asyncio.create_task(sim.run())
    _say({"pid": os.getpid()})
    commands = _commands()
    acked = 0
    while (command := await commands.get()) is not None:
        if command["cmd"] == "window":
            sim.stats.latencies.clear()
            acked = sim.stats.records_acked
        elif command["cmd"] == "end":
            acks = sorted(sim.stats.latencies)
            _say({"acked": sim.stats.records_acked - acked, "connected": sim.stats.connected,
                  "reconnects": sim.stats.reconnects, "rejected": sim.stats.rejected,
                  "ack_p50_ms": _ms(acks, 0.5), "ack_p99_ms": _ms(acks, 0.99)})  # fmt: skip
    sim.abort()
    await run


def _ms(samples: Sequence[float], q: float) -> float | None:
    return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 2) if samples else None


# --------------------------------------------------------------------------
# The parent.


class Child:
    """A child process of this file; JSON lines both ways. Stopped by closing its stdin, killed if it hangs."""

    live: ClassVar[list[Child]] = []

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.rounds: dict[int, float] = {}
        self.lost: list[str] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *argv: str) -> tuple[Child, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 20, start_new_session=True,  # Ctrl-C reaches the parent only; it stops the children
        )  # fmt: skip
        child = cls(proc)
        cls.live.append(child)
        return child, await child.reply(60.0)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if "round" in message:
                self.rounds[message["round"]] = message["t"]
            elif "lost" in message:
                self.lost.append(message["lost"])
            else:
                self.replies.put_nowait(message)
        self.replies.put_nowait({"error": f"child {self.pid} exited"})

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")

    async def ask(self, timeout: float = 60.0, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return await self.reply(timeout)

    async def reply(self, timeout: float) -> dict[str, Any]:
        message = await asyncio.wait_for(self.replies.get(), timeout)
        if "error" in message:
            raise RuntimeError(message["error"])
        return message

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                self.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 5.0)
            except asyncio.CancelledError:  # interrupted: do not wait
                self.proc.kill()
                raise
        self.reader.cancel()
        if self in Child.live:
            Child.live.remove(self)


_STARTED = time.monotonic()


def progress(text: str) -> None:
    """A progress line on stderr (stdout is for the JSON)."""
    print(f"[{time.monotonic() - _STARTED:5.1f} s] {text}", file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's threads: from schedstat (ns) where the kernel has it, else in ticks."""
    total, found = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
            found = True
    if found:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


async def connect(clients: Sequence[Child], first: int, count: int, **command: Any) -> float:
    """``count`` subscribers, split over the client processes; the seconds it took."""
    started = time.perf_counter()
    share = -(-count // len(clients))
    replies = await asyncio.gather(*(
        c.ask(300.0, cmd="connect", first=first + i * share, count=max(0, min(share, count - i * share)),
              count_total=count, **command)
        for i, c in enumerate(clients)
    ))  # fmt: skip
    if sum(r["ready"] for r in replies) != count:
        raise RuntimeError(f"only {sum(r['ready'] for r in replies)} of {count} subscribers ready")
    for c in clients:
        c.rounds.clear()
        c.lost.clear()
    return time.perf_counter() - started


async def close(clients: Sequence[Child]) -> None:
    await asyncio.gather(*(c.ask(cmd="close") for c in clients))


async def set_rounds(clients: Sequence[Child], window: int) -> None:
    await asyncio.gather(*(c.ask(cmd="rounds", window=window) for c in clients))
    for c in clients:
        c.rounds.clear()


async def fanout_run(
    server: Child, clients: Sequence[Child], subscribers: int, batch: int, seconds: float, round_deliveries: int
) -> dict[str, Any]:
    """After a warm-up batch, publish rounds of records until ``seconds`` are (about to be) over."""

    def done() -> int:
        return min(max(c.rounds, default=0) for c in clients)

    async def until(rounds: int, deadline: float = 120.0) -> None:
        limit = time.monotonic() + deadline
        while done() < rounds:
            lost = [why for c in clients for why in c.lost]
            if lost:
                raise RuntimeError(f"subscribers lost: {lost[:3]}")
            if time.monotonic() > limit:
                raise RuntimeError(f"clients stalled at round {done()} of {rounds}")
            await asyncio.sleep(0.002)

    window = batch * max(1, round(min(ROUND_RECORDS_MAX, round_deliveries / subscribers) / batch))
    await set_rounds(clients, batch)
    warm = time.time()
    server.send(cmd="publish", records=batch, batch=batch)  # lazy paths; the first estimate of a round's time
    await until(1)
    estimate = (time.time() - warm) * window / batch
    await set_rounds(clients, window)
    pids = {"server": server.pid, **{f"client{i}": c.pid for i, c in enumerate(clients)}}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.time()
    issued = 0
    while True:
        finished, elapsed = done(), time.time() - t0
        per_round = elapsed / finished if finished else estimate
        while issued - finished < INFLIGHT_ROUNDS and (
            issued < 1 or elapsed + (issued - finished + 1) * per_round < seconds
        ):
            server.send(cmd="publish", records=window, batch=batch)
            issued += 1
        if finished >= issued:
            break
        await until(finished + 1)
    wall = max(c.rounds[issued] for c in clients) - t0
    used = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
    deliveries = subscribers * window * issued
    return {
        "records_per_round": window,
        "records": window * issued,
        "deliveries": deliveries,
        "seconds": round(wall, 3),
        "deliveries_per_s": round(deliveries / wall),
        "cpu_us_per_delivery": round(used["server"] * 1e6 / deliveries, 3),
        "cpu_cores": {name: round(value / wall, 2) for name, value in used.items()},
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
        "p50_ms": _ms(ordered, 0.5),
        "p90_ms": _ms(ordered, 0.9),
        "p99_ms": _ms(ordered, 0.99),
        "max_ms": _ms(ordered, 1.0),
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
                        "ratio": {"cpu_us_per_delivery": round(relay["cpu_us_per_delivery"]
                                                               / ws["cpu_us_per_delivery"], 3),
                                  "deliveries_per_s": round(relay["deliveries_per_s"] / ws["deliveries_per_s"], 3)},
                        "ratio_flush_each_turn": {
                            "cpu_us_per_delivery": round(turn["cpu_us_per_delivery"] / ws["cpu_us_per_delivery"], 3),
                            "deliveries_per_s": round(turn["deliveries_per_s"] / ws["deliveries_per_s"], 3)},
                    })  # fmt: skip
                rss = {"subscribers": n, **{TARGETS[t]: runs[t]["idle_rss_kib_per_subscriber"] for t in TARGETS},
                       "detail": {TARGETS[t]: {k: runs[t][k] for k in ("rss_before_kib", "rss_after_kib",
                                                                       "connect_seconds", "server")}
                                  for t in TARGETS}}  # fmt: skip
            if rss:
                out["idle_rss_kib_per_subscriber"] = rss
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
    parser.add_argument("--latency-devices", type=int, default=2000)
    parser.add_argument("--latency-subscribers", type=int, default=2000)
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="0: skip the latency run (default 20)")
    parser.add_argument("--latency-warmup", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="CI smoke size: 200,1000 subscribers, short windows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.subscribers, args.seconds, args.round_deliveries = [200, 1000], 0.5, 10_000
        args.latency_devices = args.latency_subscribers = 200
        args.latency_seconds, args.latency_warmup = 2.0, 1.5
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:  # children inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    need = max([*args.subscribers, args.latency_subscribers + args.latency_devices]) + 256
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
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
