"""The loopback load of ``bench/fanout.py``: raw WebSocket subscribers, an HTTP API publisher, and the
child-process plumbing that runs them.

Subscribers speak just enough RFC 6455 (handshake, masked client frames, pong) to stay cheap: the
native protocol (``auth`` with a minted token, then ``subscribe``) or the Pusher protocol 7
(``pusher:connection_established``, then ``pusher:subscribe`` signed with the app secret, as an auth
endpoint would sign it). They count what they read and report a *round* once every socket of the
process has ``window`` more units: location frames (native), records inside ``location.updated``
events (Pusher; the data is a JSON string holding one object or an array of them), or other channel
events (Pusher, one each).

Every child prints one JSON line ``{"pid", ...}``, then obeys JSON command lines on stdin and ends
when stdin closes (its parent stopped it, or died).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import struct
import sys
import time
from array import array
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import msgspec

SECRET = "fanout-bench-secret-of-at-least-32-bytes"
COMPANY = "acme"
DEVICES_PER_COMPANY = 100
ALL_SHARE = 10  # latency run: one subscriber in ALL_SHARE of a company watches all of it
LOCATION = b'{"type":"location"'
PUSHER_LOCATION = b'{"event":"location.updated"'
# Each location.updated record is a LocationUpdate object, "id" its first field; inside the data string
# its quotes are escaped. Counted with bytes.count; the first such frame of every socket is parsed in full.
PUSHER_RECORD = b'{\\"id\\":'
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
INFLIGHT_ROUNDS = 3
_encode = msgspec.json.Encoder().encode


def fleet_of(device: int) -> tuple[str, str]:
    """(company, asset) of simulated device ``device`` in the latency run."""
    return f"fleet-{device // DEVICES_PER_COMPANY:03d}", f"truck-{device:05d}"


# --------------------------------------------------------------------------
# Children: print one JSON line {"pid", ...}, then obey JSON commands on stdin.


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def commands() -> asyncio.Queue[dict[str, Any] | None]:
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


def die_with_parent() -> None:
    """Be SIGKILLed when the parent dies, even if it is SIGKILLed itself (Linux ``PR_SET_PDEATHSIG``).

    Also a ``preexec_fn``: the setting survives ``exec`` (of node, say)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def ms(samples: Sequence[float], q: float) -> float | None:
    return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 2) if samples else None


# --- subscribers -------------------------------------------------------------------------------------


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

    path: bytes = b"/ws"

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

    @property
    def frames(self) -> int:
        return self.count  # one record per frame

    def reset(self, window: int) -> None:
        self.count, self.mark = 0, window

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(  # type: ignore[attr-defined]
            b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self.key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def upgrade(self, data: bytes) -> bytes | None:
        """The bytes after a valid 101 response; None while it is incomplete or when it is refused."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.buf = data
            return None
        accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        if not data.startswith(b"HTTP/1.1 101") or accept not in data[:end]:
            self.fail(f"handshake refused: {data[:end].decode(errors='replace')[:200]}")
            return None
        self.upgraded = True
        self.on_upgraded()
        return data[end + 4 :]

    def on_upgraded(self) -> None:
        self.write(1, self.auth)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data, self.buf = self.buf + data, b""
        if not self.upgraded:
            rest = self.upgrade(data)
            if rest is None:
                return
            data = rest
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


class PusherSubscriber(Subscriber):
    """One Pusher-protocol socket at ``/app/{key}?protocol=7``: on ``pusher:connection_established``
    it subscribes to ``channel`` (``auth`` signed with the app secret for ``private-`` channels), and
    counts units: records in ``location.updated`` events, one per ``event`` event (and their frames)."""

    def __init__(self, fleet: Fleet, key: str, secret: str, channel: str, event: str) -> None:
        super().__init__(fleet, b"", b"")
        self.path = f"/app/{key}?protocol=7&client=fleetgate-bench&version=1.0".encode()
        self.app_key, self.secret, self.channel = key, secret, channel
        self.event = b'{"event":"' + event.encode() + b'"'
        self.event_frames = 0
        self.checked = False

    @property
    def frames(self) -> int:
        return self.event_frames

    def reset(self, window: int) -> None:
        self.count, self.mark, self.event_frames = 0, window, 0

    def on_upgraded(self) -> None:
        pass  # the server speaks first

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data, self.buf = self.buf + data, b""
        if not self.upgraded:
            rest = self.upgrade(data)
            if rest is None:
                return
            data = rest
        pos, size = 0, len(data)
        while pos + 2 <= size:
            length = data[pos + 1]
            start = pos + 2
            if length >= 126:
                extra = 2 if length == 126 else 8
                if start + extra > size:
                    break
                length, start = int.from_bytes(data[start : start + extra], "big"), start + extra
            end = start + length
            if end > size:
                break
            units = 0
            if data[pos] == 0x81:
                if data.startswith(PUSHER_LOCATION, start):
                    units = data.count(PUSHER_RECORD, start, end)
                    if not self.checked:
                        self.check(data[start:end], units)
                elif data.startswith(self.event, start):
                    units = 1
            if units:
                self.event_frames += 1
                self.count += units
                while self.count >= self.mark:
                    self.fleet.reached(self.mark // self.fleet.window)
                    self.mark += self.fleet.window
            else:
                self.control(data[pos] & 0x0F, data[start:end])
            pos = end
        if pos < size:
            self.buf = data[pos:]

    def check(self, payload: bytes, counted: int) -> None:
        """The record count of the fast path, against a full parse of the event (once per socket)."""
        self.checked = True
        data = json.loads(json.loads(payload)["data"])
        records = len(data) if isinstance(data, list) else 1
        if records != counted:
            self.fail(f"location.updated: counted {counted} records, parsed {records}")

    def control(self, opcode: int, payload: bytes) -> None:
        if opcode != 0x1:
            super().control(opcode, payload)
            return
        message = json.loads(payload)
        event = message.get("event")
        if event == "pusher:connection_established":
            from relay.pusher_auth import channel_auth

            socket_id = json.loads(message["data"])["socket_id"]
            data: dict[str, str] = {"channel": self.channel}
            if self.channel.startswith("private-"):
                data["auth"] = channel_auth(self.app_key, self.secret, socket_id, self.channel)
            self.write(1, _encode({"event": "pusher:subscribe", "data": data}))
        elif event == "pusher_internal:subscription_succeeded" and not self.ready.done():
            self.ready.set_result(None)
        elif event == "pusher:ping":
            self.write(1, b'{"event":"pusher:pong","data":{}}')
        elif event in ("pusher:error", "pusher:subscription_error"):
            self.fail(payload.decode(errors="replace")[:300])


class Fleet:
    """The subscribers of one client process; reports each round once every socket has all its units."""

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
            say({"round": level, "t": time.time()})

    def lost(self, why: str) -> None:
        self.lost_reported += 1
        if self.lost_reported <= 3:
            say({"lost": why})

    def subscriber(self, g: int, command: dict[str, Any]) -> Subscriber:
        """Subscriber ``g``: Pusher when the command says ``pusher``, else a native office socket."""
        pusher = command.get("pusher")
        if pusher is not None:
            return PusherSubscriber(self, pusher["key"], pusher["secret"], pusher["channel"], pusher["event"])
        from relay.settings import AuthSettings
        from relay.tokens import mint_token

        company, asset = subscription(g, command)
        user = f"office-{g}"
        token = mint_token(AuthSettings(secret=SECRET), role="office", company=company, user=user, ttl_s=3600)
        auth = _encode({"action": "auth", "user_id": user, "role": "office", "token": token})
        subscribe = _encode({"action": "subscribe", **({"driver_id": asset} if asset else {"all": True})})
        return Subscriber(self, auth, subscribe)

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        async def one(g: int) -> Subscriber:
            conn = self.subscriber(g, command)
            source = (f"127.3.{g // 200 % 250}.{1 + g % 200}", 0)  # spread over sources: plenty of ports
            await loop.create_connection(lambda: conn, "127.0.0.1", command["port"], local_addr=source)
            await asyncio.wait_for(conn.ready, 30.0)
            return conn

        first, count = command["first"], command["count"]
        for chunk in range(first, first + count, 200):
            self.conns += await asyncio.gather(*(one(g) for g in range(chunk, min(first + count, chunk + 200))))
        return {"ready": len(self.conns), "seconds": round(time.perf_counter() - started, 2)}

    def rounds(self, window: int) -> dict[str, Any]:
        """From now on, report round k once every socket has k * ``window`` more units."""
        self.window = window
        self.levels.clear()
        for conn in self.conns:
            conn.reset(window)
        return {"window": window}

    def counts(self) -> dict[str, Any]:
        """Units and frames counted since the last ``rounds``."""
        return {"units": sum(c.count for c in self.conns), "frames": sum(c.frames for c in self.conns)}

    def close(self) -> dict[str, Any]:
        for conn in self.conns:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
        closed, self.conns = len(self.conns), []
        self.sampling = False
        return {"closed": closed}


def subscription(g: int, command: dict[str, Any]) -> tuple[str, str | None]:
    """(company, asset or None for ``all``) of subscriber ``g``: see ``bench/fanout.py``'s docstring."""
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


async def clients_main() -> None:
    """The ``clients`` child: connect, rounds, counts, window/end (latency samples), close."""
    fleet = Fleet()
    say({"pid": os.getpid()})
    queue = commands()
    while (command := await queue.get()) is not None:
        if command["cmd"] == "connect":
            try:
                say(await fleet.connect(command))
            except (OSError, TimeoutError, ConnectionError) as exc:
                say({"error": f"connect: {type(exc).__name__}: {exc}"})
        elif command["cmd"] == "close":
            say(fleet.close())
        elif command["cmd"] == "rounds":
            say(fleet.rounds(command["window"]))
        elif command["cmd"] == "counts":
            say(fleet.counts())
        elif command["cmd"] == "window":
            fleet.samples = array("d")
            fleet.sampling = True
            fleet.frames_at = sum(c.count for c in fleet.conns)
        elif command["cmd"] == "end":
            fleet.sampling = False
            with open(command["file"], "wb") as out:
                fleet.samples.tofile(out)
            frames = sum(c.count for c in fleet.conns) - fleet.frames_at
            say({"frames": frames, "samples": len(fleet.samples)})
    fleet.close()


# --- the HTTP API publisher ------------------------------------------------------------------------------


class HttpPublisher:
    """Signed ``POST /apps/{id}/events`` (pusher.md 6.1) over ``connections`` keep-alive HTTP/1.1
    connections; each takes the next event as soon as its previous response is read."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host, self.port = "127.0.0.1", int(spec["port"])
        self.app_id, self.key, self.secret = str(spec["app_id"]), spec["key"], spec["secret"]
        self.path = f"/apps/{self.app_id}/events"
        self.body = _encode({"name": spec["event"], "channels": [spec["channel"]], "data": spec["data"]})
        self.connections = int(spec.get("connections", 4))
        self.queue: asyncio.Queue[None] = asyncio.Queue()
        self.posted = 0
        self.failures = 0
        self.reconnects = 0
        self.workers: list[asyncio.Task[None]] = []

    def request(self) -> bytes:
        from relay.pusher_auth import sign_request

        signed = sign_request(self.key, self.secret, "POST", self.path, {}, self.body, now=time.time())
        query = "&".join(f"{k}={v}" for k, v in signed.items())  # hex, digits, "1.0": nothing to escape
        head = (
            f"POST {self.path}?{query} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body

    async def start(self) -> None:
        streams = [await asyncio.open_connection(self.host, self.port) for _ in range(self.connections)]
        self.workers = [asyncio.create_task(self.work(*pair)) for pair in streams]

    def publish(self, count: int) -> None:
        for _ in range(count):
            self.queue.put_nowait(None)

    async def work(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await self.queue.get()
            try:
                writer.write(self.request())
                status, body, closing = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.failure(f"HTTP API: {type(exc).__name__}: {exc}")
                closing = True
                await asyncio.sleep(0.1)
            else:
                if status != 200:
                    self.failure(f"HTTP API answered {status}: {body[:200].decode(errors='replace')}")
                else:
                    self.posted += 1
            if closing:  # soketi closes after every response (uWS res.end(body, true)): connect again
                writer.close()
                self.reconnects += 1
                reader, writer = await asyncio.open_connection(self.host, self.port)

    def failure(self, why: str) -> None:
        self.failures += 1
        if self.failures <= 3:
            say({"lost": why})

    async def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server closes the connection after it (``Connection: close``), of one
    HTTP/1.1 response with a Content-Length (what both servers send)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    length, closing = None, False
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            closing = value.strip().lower() == "close"
    if length is None:
        raise ValueError(f"no Content-Length in {status_line!r}")
    return int(status_line.split()[1]), await reader.readexactly(length), closing


async def publisher_main(spec: dict[str, Any]) -> None:
    """The ``publish-http`` child: ``publish`` (count) queues events; ``stats``; stdin closed: stop."""
    publisher = HttpPublisher(spec)
    await publisher.start()
    say({"pid": os.getpid()})
    queue = commands()
    while (command := await queue.get()) is not None:
        if command["cmd"] == "publish":
            publisher.publish(command["count"])
        elif command["cmd"] == "stats":
            say({"posted": publisher.posted, "failures": publisher.failures, "reconnects": publisher.reconnects})
    await publisher.stop()


# --------------------------------------------------------------------------
# The parent's side.


class Child:
    """A child process of ``script``; JSON lines both ways. Stopped by closing its stdin, killed if it hangs."""

    live: ClassVar[list[Child]] = []
    script: ClassVar[str] = ""  # bench/fanout.py sets it: the file whose --child flag runs a child

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
            sys.executable, cls.script, *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (from /proc ``PPid``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


# --- the load, driven from the parent ---------------------------------------------------------------------


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


def tree_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a process that just ended
            total += cpu_seconds(pid)
    return total


async def rounds_run(
    publisher: Child,
    servers: dict[str, list[int]],
    clients: Sequence[Child],
    subscribers: int,
    window: int,
    warm: int,
    seconds: float,
    **command: Any,
) -> dict[str, Any]:
    """After a warm-up of ``warm`` units, ``publisher`` publishes rounds of ``window`` units (records or
    events: ``command``) until ``seconds`` are (about to be) over; the CPU of ``servers`` (name -> pids),
    the publisher and the clients over that window, and the units and frames each socket received."""

    def done() -> int:
        return min(max(c.rounds, default=0) for c in clients)

    async def until(rounds: int, deadline: float = 120.0) -> None:
        limit = time.monotonic() + deadline
        while done() < rounds:
            lost = [why for c in (*clients, publisher) for why in c.lost]
            if lost:
                raise RuntimeError(f"lost: {lost[:3]}")
            if time.monotonic() > limit:
                raise RuntimeError(f"clients stalled at round {done()} of {rounds}")
            await asyncio.sleep(0.002)

    await set_rounds(clients, warm)
    started = time.time()
    publisher.send(cmd="publish", count=warm, **command)  # lazy paths; the first estimate of a round's time
    await until(1)
    estimate = (time.time() - started) * window / warm
    await set_rounds(clients, window)
    pids = dict(servers)
    if all(publisher.pid not in p for p in servers.values()):
        pids["publisher"] = [publisher.pid]
    pids.update({f"client{i}": [c.pid] for i, c in enumerate(clients)})
    cpu = {name: tree_cpu(p) for name, p in pids.items()}
    t0 = time.time()
    issued = 0
    while True:
        finished, elapsed = done(), time.time() - t0
        per_round = elapsed / finished if finished else estimate
        while issued - finished < INFLIGHT_ROUNDS and (
            issued < 1 or elapsed + (issued - finished + 1) * per_round < seconds
        ):
            publisher.send(cmd="publish", count=window, **command)
            issued += 1
        if finished >= issued:
            break
        await until(finished + 1)
    wall = max(c.rounds[issued] for c in clients) - t0
    used = {name: tree_cpu(p) - cpu[name] for name, p in pids.items()}
    counts = await asyncio.gather(*(c.ask(cmd="counts") for c in clients))
    return {
        "window": window,
        "units": window * issued,
        "deliveries": subscribers * window * issued,
        "frames": sum(c["frames"] for c in counts),
        "wall": wall,
        "server_cpu": used["server"],
        "cpu_cores": {name: round(value / wall, 2) for name, value in used.items()},
    }
