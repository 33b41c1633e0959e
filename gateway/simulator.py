"""Simulated trackers that speak the real protocols: GT06 and Teltonika over TCP, Teltonika over UDP.

Pure client side (asyncio, one task per device), used by ``fleetgate simulate``,
the tests and ``bench/ingest.py``. Each device behaves like the real thing
(docs/device-protocols.md):

* **GT06** (1.5-1.10): login 0x01 with the IMEI in BCD, waits for the login
  ACK, then 0x22 UTC locations (no reply expected), a 0x13 heartbeat every
  ``heartbeat_every`` frames and now and then a 0x26 alarm, both ACKed. The
  server handles a connection's frames in order and ACKs only after the
  commit, so an ACK confirms every location sent before it. Locations not
  confirmed when the connection drops are re-uploaded after the next login
  with the 0x22 re-upload flag set (pitfall 9).
* **Teltonika TCP** (2.1-2.5): IMEI packet; ``00`` stops the device (counted
  ``rejected``). Then codec 8E packets of ``records_per_packet`` records, one
  in flight: without the 4-byte ACK carrying the right count within
  ``ack_timeout``, or when the connection drops, the device reconnects and
  resends the *same* packet (same records, same timestamps).
* **Teltonika UDP** (3): one datagram per packet with a packet id and an AVL
  packet id; resent unchanged until the 7-byte ACK echoing both arrives.

Routes are deterministic for a seed: each device starts at a random point,
turns gently, drives at 0-90 km/h with stops (ignition off on long ones).
Record ``k`` of a device has fix time ``start + k * step`` (whole seconds),
so the keys of sent and ACKed records are computed, not stored: every device
sends in order and waits for each ACK, so what is ACKed is always a prefix.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trackcodecs import gt06, teltonika

PROTOCOLS = ("gt06", "teltonika", "teltonika-udp")
DEFAULT_PORTS = {"gt06": 5023, "teltonika": 5027, "teltonika-udp": 5027}
DEFAULT_IMEI_BASE = "35000000000000"
"""The first 14 digits of the first IMEI (a 15-digit IMEI is accepted too: its check digit is dropped)."""
DEVICES_PER_SOURCE_IP = 100
"""Loopback runs spread devices over 127.1.x.y sources: the gateway limits connections per IP (200)."""
MAX_RECONNECT_DELAY_S = 5.0
LATENCY_SAMPLES = 200_000

# docs/device-protocols.md 2.3/2.4, codec 8E: timestamp, priority, lng, lat, altitude, angle, satellites,
# speed | event IO, N total | N1 {239 ignition, 240 movement, 21 GSM} | N2 {66 external voltage (mV)}
# | N4 {16 odometer (m)} | N8 = 0 | NX = 0
_AVL_8E = struct.Struct(">QBiihHBHHHHHBHBHBHHHHHIHH")
_UDP_HEAD = struct.Struct(">HHBBH")  # length, packet id, 01, AVL packet id, IMEI length (3)
# 1.6 GPS block: YY MM DD hh mm ss, GPS info length | satellites, lat, lng, speed, course/status
_GT06_GPS = struct.Struct(">6BBIIBH")
_GT06_CELL = struct.Struct(">HBHBH")  # MCC, MNC, LAC, cell id (3 bytes) (1.7)
_U32 = struct.Struct(">I")
_REUPLOAD_AT = 18 + 8 + 2  # 0x22 content: GPS block, cell block, ACC, upload mode, *re-upload flag* (1.7)
_GT06_ALARMS = (0x01, 0x03, 0x06, 0x09)  # SOS, vibration, overspeed, movement (1.8)
_DEG_PER_M = 1 / 111_320.0
_RAD = math.pi / 180.0


def imei_for(base: str, index: int) -> str:
    """The ``index``-th simulated IMEI: 14 digits ``base + index`` and the Luhn check digit."""
    if not (base.isdigit() and len(base) in (14, 15)):
        raise ValueError("IMEI base must be 14 or 15 digits")
    body = int(base[:14]) + index
    if body >= 10**14:
        raise ValueError("IMEI base + device count overflows 14 digits")
    digits = f"{body:014d}"
    total = 0
    for i, ch in enumerate(reversed(digits)):  # the check digit takes position 0, so these start doubled
        d = (ord(ch) - 48) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return digits + str(-total % 10)


class Route:
    """One vehicle's plausible path, advanced one record at a time; deterministic for its ``rng``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lat = rng.uniform(47.0, 55.0)  # central Europe: land, mostly
        self.lng = rng.uniform(6.0, 24.0)
        self.heading = rng.uniform(0.0, 360.0)
        self.speed = 0.0
        self.target = rng.uniform(20.0, 90.0)
        self.stop_left = 0.0
        self.ignition = True
        self.odometer = float(rng.randrange(10_000_000, 300_000_000))  # metres
        self.altitude = rng.uniform(50.0, 400.0)
        self.sats = rng.randint(7, 13)

    def advance(self, dt: float) -> None:
        """Move ``dt`` seconds on: gentle turns, bounded acceleration, a stop every ten minutes or so."""
        rng = self.rng
        if self.stop_left > 0:
            self.stop_left -= dt
            if self.stop_left <= 0:
                self.ignition, self.target = True, rng.uniform(20.0, 90.0)
            return
        r = rng.random()
        if self.target and r < dt / 600:
            self.target = 0.0
        elif self.target and r < dt / 60:
            self.target = rng.uniform(20.0, 90.0)
        old = self.speed
        self.speed = min(self.target, old + 7.0 * dt) if self.target >= old else max(self.target, old - 12.0 * dt)
        if not self.target and not self.speed:
            self.stop_left = rng.uniform(5.0, 300.0)
            self.ignition = self.stop_left < 120.0  # a long stop: engine off
            return
        self.heading = (self.heading + (rng.random() - 0.5) * 8.0 * math.sqrt(min(dt, 30.0))) % 360.0
        dist = (old + self.speed) / 7.2 * dt  # mean speed in m/s times dt
        rad = self.heading * _RAD
        self.lat += dist * math.cos(rad) * _DEG_PER_M
        self.lng += dist * math.sin(rad) * _DEG_PER_M / math.cos(self.lat * _RAD)
        if abs(self.lat) > 80.0:
            self.lat = math.copysign(80.0, self.lat)
            self.heading = (180.0 - self.heading) % 360.0
        self.lng = (self.lng + 180.0) % 360.0 - 180.0
        self.odometer += dist
        if r > 0.9:  # now and then: a little climb or descent, a satellite more or less
            self.altitude = min(2000.0, max(0.0, self.altitude + (r - 0.95) * 40.0 * min(dt, 10.0)))
            self.sats = min(14, max(5, self.sats + (1 if r > 0.95 else -1)))


@dataclass
class SimulationStats:
    """Live counters; ``connected`` is devices logged in now (UDP: sockets open)."""

    connected: int = 0
    records_sent: int = 0  # first transmissions
    records_acked: int = 0
    records_resent: int = 0
    packets_sent: int = 0
    reconnects: int = 0
    rejected: int = 0
    connect_failures: int = 0
    logins: int = 0  # successful logins (UDP: sockets opened), over the whole run
    devices_done: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.monotonic)
    # packet sent -> ACK in seconds, the latest ``LATENCY_SAMPLES`` (when the simulation records them)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


class _Link(asyncio.Protocol):
    """A client TCP socket: writes, and reads of an exact byte count with a deadline (stop-and-wait needs no more)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.eof = False
        self.writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (asyncio's or uvloop's)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and len(self.buffer) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = self.eof or exc is None
        for fut in (self.waiter, self.writable):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    async def write(self, data: bytes) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("connection closed")
        self.transport.write(data)
        if self.writable is not None:
            await self.writable

    async def read(self, n: int, timeout: float) -> bytes:
        buf = self.buffer
        if len(buf) < n:
            if self.lost:
                raise ConnectionResetError("connection closed")
            loop = asyncio.get_running_loop()
            self.want = n
            waiter: asyncio.Future[None] = loop.create_future()
            self.waiter = waiter
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if len(buf) < n:
                raise ConnectionResetError("connection closed")
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _UdpLink(asyncio.DatagramProtocol):
    """A device's UDP socket: waits for the one ACK it expects (first 6 bytes), ignores the rest."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.expect = b""
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        w = self.waiter
        if w is not None and len(data) == 7 and data[:6] == self.expect and not w.done():
            w.set_result(data[6])

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable and the like: the resend timer covers it

    async def exchange(self, data: bytes, expect: bytes, timeout: float) -> int:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.expect = expect
        waiter: asyncio.Future[int] = loop.create_future()
        self.waiter = waiter
        timer = loop.call_later(timeout, _expire, waiter)
        self.transport.sendto(data)
        try:
            return await waiter
        finally:
            timer.cancel()
            self.waiter = None


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Rejected(Exception):
    """The gateway refused the device (Teltonika ``00``, GT06 closed without a login reply)."""


class _Device:
    """What every simulated device shares: identity, route, record numbering, pacing and the reconnect loop."""

    protocol = ""

    def __init__(self, sim: Simulation, index: int, quota: int | None) -> None:
        self.sim = sim
        self.index = index
        self.imei = imei_for(sim.imei_base, index)
        self.rng = random.Random(sim.seed * 1_000_003 + index)
        self.route = Route(self.rng)
        self.quota = quota
        self.generated = 0  # records numbered so far (sent at least once, or about to be)
        self.acked = 0
        self.rejected = False
        self.next_send = 0.0
        self.nap: asyncio.Future[None] | None = None
        self.last_ignition = True
        self.source = sim.source_for(index)

    # -- record numbering

    def fix_ms(self, k: int) -> int:
        return self.sim.start_ms + k * self.sim.step_ms

    def more_to_send(self) -> bool:
        return not self.sim.stopping and (self.quota is None or self.generated < self.quota)

    def outstanding(self) -> bool:
        raise NotImplementedError

    def confirm(self, n: int) -> None:
        self.acked += n
        self.sim.stats.records_acked += n

    # -- timing

    async def sleep_until(self, when: float) -> None:
        """Sleep until loop time ``when``; :meth:`Simulation.stop` wakes sleepers early."""
        loop = asyncio.get_running_loop()
        if when <= loop.time() or self.sim.stopping:
            return
        fut = self.nap = loop.create_future()
        handle = loop.call_at(when, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self.nap = None

    async def pace(self) -> None:
        """Wait for the next send slot, ``interval`` after the previous one (no catch-up burst when late)."""
        interval = self.sim.interval
        if interval <= 0:
            return
        now = asyncio.get_running_loop().time()
        self.next_send = max(self.next_send + interval, now) if self.next_send else now
        await self.sleep_until(self.next_send)

    # -- connection loop

    async def run(self, delay: float) -> None:
        await self.sleep_until(asyncio.get_running_loop().time() + delay)
        failures = 0
        while not self.rejected and (self.more_to_send() or self.outstanding()):
            try:
                await self.connect_and_send()
                failures = 0
            except _Rejected:
                self.rejected = True
                self.sim.stats.rejected += 1
                break
            except (OSError, TimeoutError) as exc:
                self.sim.stats.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                failures += 1
            if self.more_to_send() or self.outstanding():
                self.sim.stats.reconnects += 1
                delay = min(self.sim.reconnect_delay * 2 ** max(0, failures - 1), MAX_RECONNECT_DELAY_S)
                await self.sleep_until(asyncio.get_running_loop().time() + delay * random.uniform(0.5, 1.0))
        self.sim.stats.devices_done += 1

    async def connect_and_send(self) -> None:
        sim = self.sim
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(sim.ack_timeout):
                local = (self.source, 0) if self.source else None
                _, link = await loop.create_connection(_Link, sim.host, sim.port, local_addr=local)
        except (OSError, TimeoutError):
            sim.stats.connect_failures += 1
            raise
        up = False
        try:
            await self.login(link)
            up = True
            sim.stats.connected += 1
            sim.stats.logins += 1
            await self.session(link)
        finally:
            link.close()
            if up:
                sim.stats.connected -= 1

    async def login(self, link: _Link) -> None:
        raise NotImplementedError

    async def session(self, link: _Link) -> None:
        raise NotImplementedError

    def latency(self, sent: float) -> None:
        if self.sim.record_latency:
            self.sim.stats.latencies.append(time.perf_counter() - sent)


class _Packet:
    """A Teltonika packet or datagram as sent, kept byte for byte until ACKed."""

    __slots__ = ("count", "data", "expect", "sent")

    def __init__(self, data: bytes, count: int, expect: bytes = b"") -> None:
        self.data = data
        self.count = count
        self.expect = expect
        self.sent = False


class _TeltonikaDevice(_Device):
    def __init__(self, sim: Simulation, index: int, quota: int | None) -> None:
        super().__init__(sim, index, quota)
        self.pending: _Packet | None = None
        self.ext_mv = self.rng.randint(12_600, 14_200)
        self.gsm = self.rng.randint(3, 5)

    def outstanding(self) -> bool:
        return self.pending is not None

    def data_field(self) -> tuple[bytes, int]:
        """codec 8E | N1 | the next records | N2 (2.2), advancing the route once per record."""
        n = self.sim.records_per_packet
        if self.quota is not None:
            n = min(n, self.quota - self.generated)
        route, dt, pack = self.route, self.sim.step_ms / 1000, _AVL_8E.pack
        parts = [bytes((0x8E, n))]
        for _ in range(n):
            route.advance(dt)
            ign = route.ignition
            event = 239 if ign != self.last_ignition else 0
            self.last_ignition = ign
            speed = round(route.speed)
            # fmt: off
            parts.append(pack(
                self.fix_ms(self.generated), 0, round(route.lng * 1e7), round(route.lat * 1e7),
                round(route.altitude), int(route.heading) % 360, route.sats, speed,
                event, 5, 3, 239, ign, 240, speed > 0, 21, self.gsm,
                1, 66, self.ext_mv if ign else 12_400, 1, 16, int(route.odometer), 0, 0,
            ))
            # fmt: on
            self.generated += 1
        parts.append(bytes((n,)))
        self.sim.stats.records_sent += n
        return b"".join(parts), n

    def next_packet(self) -> _Packet:
        data, n = self.data_field()
        return _Packet(teltonika.frame_data_field(data), n)

    async def login(self, link: _Link) -> None:
        await link.write(struct.pack(">H", len(self.imei)) + self.imei.encode())
        reply = await link.read(1, self.sim.ack_timeout)
        if reply != b"\x01":
            raise _Rejected

    async def session(self, link: _Link) -> None:
        """Over TCP a wrong count, no ACK in time or a drop ends the connection; the packet goes again after."""
        timeout = self.sim.ack_timeout

        async def transfer(packet: _Packet) -> int | None:
            await link.write(packet.data)
            count = int.from_bytes(await link.read(4, timeout), "big")
            if count != packet.count:
                raise ConnectionResetError(f"ACK for {count} records, sent {packet.count}")
            return count

        await self.send_packets(transfer)

    async def send_packets(self, transfer: Callable[[_Packet], Awaitable[int | None]]) -> None:
        """Stop-and-wait: one packet in flight until ``transfer`` returns its ACKed count (None: send it again)."""
        stats = self.sim.stats
        while True:
            if self.pending is None:
                if not self.more_to_send():
                    return
                await self.pace()
                if not self.more_to_send():
                    return
                self.pending = self.next_packet()
            packet = self.pending
            if packet.sent:
                stats.records_resent += packet.count
            packet.sent = True
            stats.packets_sent += 1
            sent = time.perf_counter()
            count = await transfer(packet)
            if count is not None:
                self.latency(sent)
                self.pending = None
                self.confirm(count)


class _TeltonikaUdpDevice(_TeltonikaDevice):
    def __init__(self, sim: Simulation, index: int, quota: int | None) -> None:
        super().__init__(sim, index, quota)
        self.packet_id = self.rng.randrange(0x10000)
        self.avl_id = self.rng.randrange(0x100)

    def next_packet(self) -> _Packet:
        """``length | packet id | 01 | AVL packet id | IMEI length | IMEI | data field`` (3)."""
        data, n = self.data_field()
        self.avl_id = (self.avl_id + 1) & 0xFF
        head = _UDP_HEAD.pack(6 + len(self.imei) + len(data), self.packet_id, 1, self.avl_id, len(self.imei))
        expect = struct.pack(">HHBB", 5, self.packet_id, 1, self.avl_id)
        return _Packet(head + self.imei.encode() + data, n, expect)

    async def connect_and_send(self) -> None:
        """Each datagram is sent again until its ACK (echoing packet id and AVL packet id) arrives in time."""
        sim = self.sim
        loop = asyncio.get_running_loop()
        _, link = await loop.create_datagram_endpoint(_UdpLink, remote_addr=(sim.host, sim.port))

        async def transfer(packet: _Packet) -> int | None:
            try:
                count = await link.exchange(packet.data, packet.expect, sim.ack_timeout)
            except TimeoutError:
                return None
            if count != packet.count:  # not all stored: keep the packet, try again a little later
                await self.sleep_until(loop.time() + sim.reconnect_delay)
                return None
            return count

        sim.stats.connected += 1
        sim.stats.logins += 1
        try:
            await self.send_packets(transfer)
        finally:
            sim.stats.connected -= 1
            if link.transport is not None:
                link.transport.close()


class _Gt06Device(_Device):
    def __init__(self, sim: Simulation, index: int, quota: int | None) -> None:
        super().__init__(sim, index, quota)
        self.serial = 0
        self.unconfirmed: list[tuple[int, bytearray]] = []  # (type, content) sent since the last ACK
        self.since_heartbeat = 0
        self.terminal_id = bytes.fromhex("0" + self.imei)  # 16 BCD nibbles, a leading 0 (1.5)
        self.cell = _GT06_CELL.pack(262, 1, self.rng.randrange(1, 0xFFFF), 0, self.rng.randrange(1, 0xFFFF))

    def outstanding(self) -> bool:
        return bool(self.unconfirmed)

    def next_serial(self) -> int:
        self.serial = self.serial % 0xFFFF + 1  # 1, 2, ... 0xFFFF, 1 (1.3)
        return self.serial

    def gps_block(self) -> bytes:
        route = self.route
        route.advance(self.sim.step_ms / 1000)
        t = time.gmtime(self.fix_ms(self.generated) // 1000)
        course = int(route.heading) % 360
        status = 0x1000 | (0x0400 if route.lat >= 0 else 0) | (0x0800 if route.lng < 0 else 0) | course
        lat, lng = round(abs(route.lat) * 1_800_000), round(abs(route.lng) * 1_800_000)
        ymdhms = (t.tm_year - 2000, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
        return _GT06_GPS.pack(*ymdhms, 0xC0 | route.sats, lat, lng, round(route.speed), status)

    def next_record(self) -> tuple[int, bytearray]:
        """A 0x22 location (1.7) or, now and then, a 0x26 alarm (1.9) with the next fix."""
        gps = self.gps_block()
        route = self.route
        self.generated += 1
        self.sim.stats.records_sent += 1
        if self.sim.alarm_every and self.rng.random() * self.sim.alarm_every < 1.0:
            info = 0x40 | 0x04 | (0x02 if route.ignition else 0)
            code = self.rng.choice(_GT06_ALARMS)
            return 0x26, bytearray(gps + b"\x09" + self.cell + bytes((info, 6, 4, code, 0x02)))
        tail = bytes((route.ignition, 0x00, 0x00)) + _U32.pack(int(route.odometer))
        return 0x22, bytearray(gps + self.cell + tail)

    async def login(self, link: _Link) -> None:
        serial = self.next_serial()
        await link.write(gt06.build_frame(0x01, self.terminal_id, serial))
        try:
            reply = await link.read(10, self.sim.ack_timeout)
        except ConnectionResetError:
            if link.eof:
                raise _Rejected from None  # closed without a login reply: unknown IMEI (1.5)
            raise
        if reply != gt06.ack(0x01, serial):
            raise ConnectionResetError(f"unexpected login reply {reply.hex()}")

    async def acked_frame(self, link: _Link, msg_type: int, content: bytes) -> None:
        """Send a frame the server ACKs; its ACK confirms every frame sent before it on this connection."""
        serial = self.next_serial()
        sent = time.perf_counter()
        await link.write(gt06.build_frame(msg_type, content, serial))
        reply = await link.read(10, self.sim.ack_timeout)
        if reply != gt06.ack(msg_type, serial):
            raise ConnectionResetError(f"unexpected reply {reply.hex()} to 0x{msg_type:02x}")
        self.latency(sent)
        self.confirm(len(self.unconfirmed))
        self.unconfirmed.clear()
        self.since_heartbeat = 0

    async def heartbeat(self, link: _Link) -> None:
        info = 0x40 | 0x04 | (0x02 if self.route.ignition else 0)  # GPS on, charging, ACC (1.8)
        await self.acked_frame(link, 0x13, bytes((info, 6, 4, 0x00, 0x02)))

    async def session(self, link: _Link) -> None:
        stats = self.sim.stats
        if self.unconfirmed:  # re-upload what the last connection did not confirm, locations flagged as such
            backlog, self.unconfirmed = self.unconfirmed, []
            for msg_type, content in backlog:
                self.unconfirmed.append((msg_type, content))
                stats.records_resent += 1
                stats.packets_sent += 1
                if msg_type != 0x22:
                    await self.acked_frame(link, msg_type, bytes(content))  # an alarm is ACKed on its own
                    continue
                content[_REUPLOAD_AT] = 0x01
                await link.write(gt06.build_frame(msg_type, bytes(content), self.next_serial()))
            if self.unconfirmed:
                await self.heartbeat(link)
        while True:
            if not self.more_to_send():
                if self.unconfirmed:
                    await self.heartbeat(link)
                return
            await self.pace()
            if not self.more_to_send():
                continue
            msg_type, content = self.next_record()
            self.unconfirmed.append((msg_type, content))
            stats.packets_sent += 1
            if msg_type != 0x22:
                await self.acked_frame(link, msg_type, bytes(content))
                continue
            await link.write(gt06.build_frame(msg_type, bytes(content), self.next_serial()))
            self.since_heartbeat += 1
            if self.since_heartbeat >= self.sim.heartbeat_every:
                await self.heartbeat(link)


_DEVICE_CLASSES: dict[str, Callable[[Simulation, int, int | None], _Device]] = {
    "gt06": _Gt06Device,
    "teltonika": _TeltonikaDevice,
    "teltonika-udp": _TeltonikaUdpDevice,
}


class Simulation:
    """``devices`` simulated trackers of one protocol against ``host:port``; see the module docstring.

    ``interval`` is the time between two sends of one device (a GT06 frame, a
    Teltonika packet or datagram); 0 sends the next as soon as the previous
    was ACKed (load mode). Fix times advance by ``step_s`` per record (by
    default the interval spread over the packet's records, at least 1 s).
    The run ends after ``duration`` (then in-flight packets get ``grace``
    seconds to be ACKed), or with ``total_records`` when every record was
    ACKed or ``deadline`` passed, or at :meth:`stop`.
    """

    def __init__(
        self,
        protocol: str,
        devices: int,
        host: str = "127.0.0.1",
        port: int | None = None,
        interval: float = 1.0,
        duration: float | None = None,
        records_per_packet: int = 10,
        total_records: int | None = None,
        imei_base: str = DEFAULT_IMEI_BASE,
        seed: int = 0,
        *,
        ack_timeout: float = 5.0,
        reconnect_delay: float = 0.5,
        heartbeat_every: int = 10,
        alarm_every: int = 50,
        step_s: int | None = None,
        start_time: datetime | None = None,
        ramp_s: float | None = None,
        deadline: float = 60.0,
        grace: float | None = None,
        record_latency: bool = False,
        spread_sources: bool | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if devices < 1 or interval < 0 or not 1 <= records_per_packet <= 255:
            raise ValueError("need devices >= 1, interval >= 0 and 1 <= records_per_packet <= 255")
        imei_for(imei_base, devices - 1)  # validates the base and the range
        self.protocol = protocol
        self.host = host
        self.port = DEFAULT_PORTS[protocol] if port is None else port
        self.interval = interval
        self.duration = duration
        self.records_per_packet = records_per_packet if protocol != "gt06" else 1
        self.total_records = total_records
        self.imei_base = imei_base
        self.seed = seed
        self.ack_timeout = ack_timeout
        self.reconnect_delay = reconnect_delay
        self.heartbeat_every = max(1, heartbeat_every)
        self.alarm_every = alarm_every
        if step_s is None:
            step_s = max(1, round(interval / self.records_per_packet))
        self.step_ms = 1000 * step_s
        start = start_time or datetime.now(UTC)
        self.start_ms = int(start.timestamp()) * 1000
        self.ramp_s = min(interval, 2.0) if ramp_s is None else ramp_s
        if ramp_s is None and interval == 0:
            self.ramp_s = min(devices / 2000, 2.0)
        self.deadline = deadline
        self.grace = ack_timeout + 0.5 if grace is None else grace
        self.record_latency = record_latency
        if spread_sources is None:
            spread_sources = (
                host.startswith("127.") and sys.platform.startswith("linux") and protocol != "teltonika-udp"
            )
        self.spread_sources = spread_sources
        self.stats = SimulationStats()
        self.stopping = False
        quotas = self._quotas(devices)
        self.devices = [_DEVICE_CLASSES[protocol](self, i, quotas[i]) for i in range(devices)]
        self.imeis = [d.imei for d in self.devices]
        self._finished: asyncio.Future[None] | None = None

    def _quotas(self, devices: int) -> list[int | None]:
        if self.total_records is None:
            return [None] * devices
        share, extra = divmod(self.total_records, devices)
        return [share + (1 if i < extra else 0) for i in range(devices)]

    def source_for(self, index: int) -> str | None:
        """The loopback source address of device ``index`` (127.1.x.y, 100 devices each), or None."""
        if not self.spread_sources:
            return None
        group = index // DEVICES_PER_SOURCE_IP
        return f"127.{1 + group // 256 % 254}.{group % 256}.{1 + index % DEVICES_PER_SOURCE_IP}"

    async def run(self) -> SimulationStats:
        """Run every device to the end (see the class docstring); returns the final stats."""
        loop = asyncio.get_running_loop()
        self.stats.started = time.monotonic()
        finished = self._finished = loop.create_future()
        n = len(self.devices)
        tasks = [
            loop.create_task(d.run(self.ramp_s * i / n), name=f"sim-{self.protocol}-{i}")
            for i, d in enumerate(self.devices)
        ]
        remaining = len(tasks)

        def one_done(_: asyncio.Task[None]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                _wake(finished)

        for task in tasks:
            task.add_done_callback(one_done)
        timers = []
        if self.duration is not None:
            timers.append(loop.call_later(self.duration, self.stop))
        if self.total_records is not None:
            timers.append(loop.call_later(self.deadline, _wake, finished))
        try:
            await finished
        finally:
            for timer in timers:
                timer.cancel()
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]
        return self.stats

    def stop(self) -> None:
        """No new records from now on; in-flight ones get ``grace`` seconds to be ACKed, then the run ends."""
        if self.stopping:
            return
        self.stopping = True
        for device in self.devices:
            if device.nap is not None:
                _wake(device.nap)
        if self._finished is not None:
            asyncio.get_running_loop().call_later(self.grace, _wake, self._finished)

    def abort(self) -> None:
        """End the run now (un-ACKed records stay un-ACKed)."""
        self.stopping = True
        if self._finished is not None:
            _wake(self._finished)

    def sent_keys(self) -> set[tuple[str, int]]:
        """``(imei, fix time ms)`` of every record sent at least once."""
        return {(d.imei, d.fix_ms(k)) for d in self.devices for k in range(d.generated)}

    def acked_keys(self) -> set[tuple[str, int]]:
        """``(imei, fix time ms)`` of every record the gateway acknowledged (GT06: confirmed by a later ACK)."""
        return {(d.imei, d.fix_ms(k)) for d in self.devices for k in range(d.acked)}
