"""End-to-end ingest over loopback, printed as JSON.

Simulated Teltonika devices (``gateway.simulator``: codec 8E packets of
``--records-per-packet`` records, one packet in flight per connection, 100
connections per 127.1.x.y source address) load a server running in a *child
process*, so load generator and server do not share an event loop. Servers:

* ``memory``: a ``Gateway`` with the in-process bus and the SQLite state store,
  as ``fleetgate run`` runs it;
* ``redis``: a ``Gateway`` with the Redis bus and the Redis state store, as
  ``fleetgate gateway`` runs it, on a private redis-server (AOF fsynced on
  every write unless ``--no-aof``);
* ``bare``: an asyncio server that reads the IMEI, answers 01, then answers
  each packet with its record count, decoding nothing: the ratios to it hold
  on any machine.

Each figure comes from a fresh child, uvloop on both sides:

* ``throughput``: every device sends its next packet as soon as the previous
  one was ACKed; records ACKed (= committed) per second over ``--seconds``;
* ``latency``: a fixed offered load of ``--latency-rate`` records/s (each
  device sends a packet every devices * K / rate seconds, phases spread);
  ACK latency packet written -> ACK read, as the simulator sees it;
* ``rss_per_idle_connection``: (VmRSS with ``--devices`` idle logged-in
  connections - VmRSS with none) / ``--devices``.

``cpu_cores`` (CPU seconds per wall second of each process) shows which
process was the bottleneck; ``server_stalls`` gives event-loop lag and
garbage-collector pauses inside the gateway during the window.

    python bench/ingest.py [--devices 1000] [--seconds 8] [--latency-rate 20000] [--targets memory,bare,redis,rss]
                           [--no-aof] [--profile DIR]  # DIR/<target>.prof: cProfile of the throughput window
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "codecs"), str(ROOT)]

from gateway.simulator import DEVICES_PER_SOURCE_IP, Simulation, imei_for  # noqa: E402

GOALS = {  # on the 2-core reference machine
    "memory_records_per_s": 100_000,
    "redis_records_per_s": 50_000,
    "ack_p99_ms": 20.0,
    "rss_per_idle_connection_bytes": 8 * 1024,
}
IMEI_BASE = 35100000000000
PHASE_IMEIS = 100_000  # each child gets its own IMEI range, so no phase's records collide with another's


# --------------------------------------------------------------------------
# Child processes: print {"pid", "ports"} as one JSON line, then obey stdin.


def child_main(args: argparse.Namespace) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(_child(args))


async def _child(args: argparse.Namespace) -> None:
    """Commands on stdin, one a line: ``window`` starts the measured window, ``end`` ends it (the child
    answers with one JSON line of what it saw inside); end of input stops the child."""
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    partial = b""

    def readable() -> None:
        nonlocal partial
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            loop.remove_reader(sys.stdin.fileno())
            commands.put_nowait("eof")
            return
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:
            commands.put_nowait(line.decode().strip())

    loop.add_reader(sys.stdin.fileno(), readable)
    gateway: Any = None
    if args.child == "bare":
        server = await loop.create_server(BareAckServer, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
    else:
        gateway = await _start_gateway(args)
        port = gateway.port("teltonika")
    _say({"pid": os.getpid(), "port": port})
    stalls = StallMeter()
    profile = None
    while (command := await commands.get()) != "eof":
        if command == "window":
            stalls.reset()
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
        elif command == "end":
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
            _say({**stalls.summary(), **(_gateway_counters() if gateway is not None else {})})
    if gateway is not None:
        await gateway.stop(2.0)
        await gateway.bus.close()
        await gateway.store.close()
    else:
        server.close()


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _start_gateway(args: argparse.Namespace) -> Any:
    import logging

    import msgspec

    from gateway.bus import open_bus
    from gateway.records import Device
    from gateway.service import Gateway
    from gateway.settings import GatewaySettings
    from gateway.state import open_state

    logging.basicConfig(level=logging.WARNING)
    driver = args.child.removeprefix("gateway-")
    settings = msgspec.convert(
        {
            "listeners": {"host": "127.0.0.1", "teltonika_port": 0, "gt06": False, "teltonika_udp": False},
            # Bounded memory for a bench that commits millions of records; the work per record is the same.
            "bus": {"driver": driver, "redis_url": args.redis_url, "positions_maxlen": 200_000,
                    "memory_dedup_max": 400_000},
            "state": {"driver": "sqlite" if driver == "memory" else "redis", "redis_url": args.redis_url,
                      "sqlite_path": str(Path(args.workdir) / "state.sqlite")},
        },
        GatewaySettings,
    )  # fmt: skip
    store = open_state(settings.state)
    base, count = map(int, args.register.split(":"))
    for i in range(count):  # registered beforehand, as in production: logins are lookups
        imei = imei_for(str(base), i)
        await store.put_device(Device(imei=imei, asset_id=f"sim-{imei}", company_id="bench"))
    gateway = Gateway(settings, open_bus(settings.bus), store)
    await gateway.start()
    return gateway


class StallMeter:
    """Where latency hides: event-loop lag (how late a 5 ms ticker wakes) and garbage-collector pauses."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.gc_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)
        self._task = asyncio.get_running_loop().create_task(self._tick())

    def reset(self) -> None:
        self.lags.clear()
        for pauses in self.gc_ms.values():
            pauses.clear()

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_ms[info["generation"]].append((time.perf_counter() - self._gc_start) * 1000)

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append((time.perf_counter() - t - 0.005) * 1000)

    def summary(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        out = {
            "loop_lag_p50_ms": round(lags[len(lags) // 2], 2),
            "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99)], 2),
            "loop_lag_max_ms": round(lags[-1], 2),
        }
        for gen, pauses in self.gc_ms.items():
            out[f"gc{gen}_count"] = len(pauses)
            out[f"gc{gen}_total_ms"] = round(sum(pauses), 1)
            out[f"gc{gen}_max_ms"] = round(max(pauses, default=0.0), 2)
        return out


def _gateway_counters() -> dict[str, float]:
    """The gateway's counters that explain a result: close reasons, commits, duplicates, batch sizes."""
    from gateway import metrics

    wanted = ("closed_connections", "records_committed", "duplicates_dropped", "commit_batch_size", "commit_latency")
    out: dict[str, float] = {}
    for family in metrics.REGISTRY.collect():
        if any(w in family.name for w in wanted):
            for sample in family.samples:
                if not sample.name.endswith(("_bucket", "_created")):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class BareAckServer(asyncio.Protocol):
    """Teltonika framing only: IMEI -> 01; each packet -> its N1 as 4 bytes. No CRC, no decoding, no storage."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.logged_in = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        assert self.transport is not None
        pos = 0
        while True:
            if not self.logged_in:
                if len(buf) - pos < 2 or len(buf) - pos < 2 + int.from_bytes(buf[pos : pos + 2], "big"):
                    break
                pos += 2 + int.from_bytes(buf[pos : pos + 2], "big")
                self.logged_in = True
                self.transport.write(b"\x01")
                continue
            if len(buf) - pos < 10:
                break
            size = 12 + int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if len(buf) - pos < size:
                break
            self.transport.write(struct.pack(">I", buf[pos + 9]))
            pos += size
        del buf[:pos]


# --------------------------------------------------------------------------
# The parent: children, load, measurements.


class Child:
    """A server child process in its own IMEI range; stopped by closing its stdin (killed if it hangs)."""

    counter = 0

    def __init__(self, mode: str, workdir: Path, devices: int, *, redis_url: str = "", profile: str = "") -> None:
        Child.counter += 1
        self.imei_base = IMEI_BASE + Child.counter * PHASE_IMEIS
        argv = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--redis-url", redis_url,
                "--register", f"{self.imei_base}:{devices + 20}"]  # fmt: skip
        if profile:
            argv += ["--profile", profile]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = self._read()
        self.pid: int = hello["pid"]
        self.port: int = hello["port"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench child exited with status {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def command(self, name: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name.encode() + b"\n")
        self.proc.stdin.flush()

    async def report(self) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self._read)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class CpuMeter:
    """CPU seconds per wall second of some processes over a window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = time.perf_counter()
        self.cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def cores(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {name: round((cpu_seconds(pid) - self.cpu[name]) / wall, 2) for name, pid in self.pids.items()}


async def load_window(child: Child, sim: Simulation, warmup: float, seconds: float, pids: dict[str, int]) -> dict:
    """Run ``sim``; after ``warmup``, measure ``seconds``: ACKed records/s, CPU, what the child saw."""
    run = asyncio.create_task(sim.run())
    try:
        await asyncio.sleep(warmup)
        sim.stats.latencies.clear()
        child.command("window")
        acked, started, cpu = sim.stats.records_acked, time.perf_counter(), CpuMeter(pids)
        await asyncio.sleep(seconds)
        rate = (sim.stats.records_acked - acked) / (time.perf_counter() - started)
        cores = cpu.cores()
        child.command("end")
    finally:
        sim.abort()
        await run
    return {
        "records_per_s": round(rate),
        "connected_at_end": sim.stats.connected,
        "reconnects": sim.stats.reconnects,
        "cpu_cores": cores,
        "server_stalls": await child.report(),
    }


async def throughput(target: str, args: argparse.Namespace, work: Path, redis: tuple[str, int] | None) -> dict:
    profile = str(Path(args.profile).resolve() / f"{target}.prof") if args.profile and target != "bare" else ""
    child = Child(_mode(target), work, args.devices, redis_url=redis[0] if redis else "", profile=profile)
    sim = Simulation(
        "teltonika", args.devices, port=child.port, interval=0, records_per_packet=args.records_per_packet,
        imei_base=str(child.imei_base), ack_timeout=10.0,
    )  # fmt: skip
    try:
        return await load_window(child, sim, args.warmup, args.seconds, _pids(child, redis))
    finally:
        child.stop()


async def latency(target: str, args: argparse.Namespace, work: Path, redis: tuple[str, int] | None) -> dict:
    child = Child(_mode(target), work, args.devices, redis_url=redis[0] if redis else "")
    interval = args.devices * args.records_per_packet / args.latency_rate
    sim = Simulation(
        "teltonika", args.devices, port=child.port, interval=interval, records_per_packet=args.records_per_packet,
        imei_base=str(child.imei_base), ack_timeout=10.0, ramp_s=interval, record_latency=True,
    )  # fmt: skip
    try:
        result = await load_window(
            child, sim, max(args.warmup, 2 * interval), args.latency_seconds, _pids(child, redis)
        )
    finally:
        child.stop()
    samples = sorted(sim.stats.latencies)

    def ms(q: float) -> float | None:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 2) if samples else None

    acked = result.pop("records_per_s")
    return {"offered_records_per_s": round(args.latency_rate), "acked_records_per_s": acked, "packets": len(samples),
            "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": ms(1.0), **result}  # fmt: skip


def _mode(target: str) -> str:
    return "bare" if target == "bare" else f"gateway-{target}"


def _pids(child: Child, redis: tuple[str, int] | None) -> dict[str, int]:
    return {"client": os.getpid(), "server": child.pid, **({"redis": redis[1]} if redis else {})}


async def idle_rss(target: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """RSS growth of the server per idle logged-in Teltonika connection."""
    child = Child(_mode(target), work, args.devices)
    loop = asyncio.get_running_loop()

    async def login(i: int) -> asyncio.StreamWriter:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((f"127.1.{i // DEVICES_PER_SOURCE_IP}.{1 + i % DEVICES_PER_SOURCE_IP}", 0))
        await loop.sock_connect(sock, ("127.0.0.1", child.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        imei = imei_for(str(child.imei_base), i).encode()
        writer.write(struct.pack(">H", len(imei)) + imei)
        if await asyncio.wait_for(reader.readexactly(1), 10) != b"\x01":
            raise RuntimeError("bench device refused")
        return writer

    try:
        for writer in [await login(args.devices + i) for i in range(20)]:  # lazy imports, caches, pools
            writer.close()
        await asyncio.sleep(1.0)
        before = rss_bytes(child.pid)
        writers: list[asyncio.StreamWriter] = []
        for start in range(0, args.devices, 100):
            writers += await asyncio.gather(*(login(i) for i in range(start, min(args.devices, start + 100))))
        await asyncio.sleep(1.0)
        after = rss_bytes(child.pid)
        for writer in writers:
            writer.close()
    finally:
        child.stop()
    return {"rss_before": before, "rss_after": after, "per_connection_bytes": round((after - before) / args.devices)}


@contextlib.contextmanager
def redis_server(directory: Path, aof: bool) -> Iterator[tuple[str, int]]:
    """A private redis-server on a free loopback port (started as tests/servers.py does), stopped by PID."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (make test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
            "--daemonize", "no", "--protected-mode", "yes"]  # fmt: skip
    argv += ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    with open(directory / "redis.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    targets = args.targets.split(",")
    out: dict[str, Any] = {
        "bench": "ingest",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loop": "uvloop",
        "devices": args.devices,
        "records_per_packet": args.records_per_packet,
    }
    with tempfile.TemporaryDirectory(prefix="fleetgate-bench-") as tmp:
        work = Path(tmp)
        for target in ("memory", "bare"):
            if target in targets:
                (work / target).mkdir()
                out[target] = {
                    "throughput": await throughput(target, args, work / target, None),
                    "latency": await latency(target, args, work / target, None),
                }
        if "redis" in targets:
            (work / "redis").mkdir()
            with redis_server(work / "redis", aof=not args.no_aof) as redis:
                out["redis"] = {
                    "aof_fsync_always": not args.no_aof,
                    "throughput": await throughput("redis", args, work / "redis", redis),
                    "latency": await latency("redis", args, work / "redis", redis),
                }
        if "rss" in targets:
            (work / "rss").mkdir()
            out["rss_per_idle_connection"] = {
                "gateway": await idle_rss("memory", args, work / "rss"),
                "bare": await idle_rss("bare", args, work / "rss"),
            }
    out["ratios_to_bare"] = _ratios(out)
    out["goals"] = _goals(out)
    return out


def _ratios(out: dict[str, Any]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    if "bare" in out:
        bare = out["bare"]
        for name in ("memory", "redis"):
            if name in out:
                tp = out[name]["throughput"]["records_per_s"] / max(bare["throughput"]["records_per_s"], 1)
                ratios[f"{name}_throughput"] = round(tp, 3)
                p99 = (out[name]["latency"]["p99_ms"] or 0) / max(bare["latency"]["p99_ms"] or 0, 0.01)
                ratios[f"{name}_ack_p99"] = round(p99, 1)
    if "rss_per_idle_connection" in out:
        rss = out["rss_per_idle_connection"]
        per = rss["gateway"]["per_connection_bytes"] / max(rss["bare"]["per_connection_bytes"], 1)
        ratios["rss_per_idle_connection"] = round(per, 1)
    return ratios


def _goals(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def get(*path: str) -> Any:
        node: Any = out
        for key in path:
            if key not in node:
                return None
            node = node[key]
        return node

    measured = {
        "memory_records_per_s": get("memory", "throughput", "records_per_s"),
        "redis_records_per_s": get("redis", "throughput", "records_per_s"),
        "ack_p99_ms": get("memory", "latency", "p99_ms"),
        "rss_per_idle_connection_bytes": get("rss_per_idle_connection", "gateway", "per_connection_bytes"),
    }
    goals: dict[str, dict[str, Any]] = {}
    for key, goal in GOALS.items():
        value = measured[key]
        at_most = key in ("ack_p99_ms", "rss_per_idle_connection_bytes")
        met = None if value is None else (value <= goal if at_most else value >= goal)
        goals[key] = {"goal": goal, "measured": value, "met": met}
    redis_p99 = get("redis", "latency", "p99_ms")
    if redis_p99 is not None:
        goals["redis_ack_p99_ms"] = {"goal": GOALS["ack_p99_ms"], "measured": redis_p99, "met": redis_p99 <= 20.0}
    return goals


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="connections (default 1000)")
    parser.add_argument("--records-per-packet", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput window per target (default 8)")
    parser.add_argument("--latency-seconds", type=float, default=6.0, help="latency window per target (default 6)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before each window (default 2)")
    parser.add_argument("--latency-rate", type=float, default=20_000.0, help="offered records/s (default 20000)")
    parser.add_argument("--targets", default="memory,bare,redis,rss", help="what to measure (default: all)")
    parser.add_argument("--no-aof", action="store_true", help="Redis without appendfsync always")
    parser.add_argument("--profile", help="directory for cProfile dumps of the gateway's throughput windows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--register", default="0:0", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * args.devices + 256
    if soft < need:  # children inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    import uvloop

    uvloop.install()
    print(json.dumps(asyncio.run(bench(args)), indent=2))


if __name__ == "__main__":
    main()
