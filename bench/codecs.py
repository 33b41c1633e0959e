"""Codec throughput on one core, printed as JSON.

Teltonika: codec 8E packets of 10 records with 10 IO elements each, fed one
packet per ``receive_data`` call (as a socket read would), decoded into full
``Position`` structs. GT06: 0x12 location frames, one per call. Beside each
rate, the same run measures a bare ``struct.unpack_from`` pass over the same
bytes (record headers / GPS blocks), so the ratio is comparable across
machines.

    python bench/codecs.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "codecs"))

from trackcodecs import gt06, teltonika

RECORDS_PER_PACKET = 10
PACKETS = 100
GT06_FRAMES = 1000


def teltonika_8e_packet(first_ms: int) -> bytes:
    """A codec 8E packet: 10 records, each with 4 x u8, 3 x u16, 2 x u32, 1 x u64 IO elements and no NX."""
    body = bytearray([0x8E, RECORDS_PER_PACKET])
    for i in range(RECORDS_PER_PACKET):
        body += struct.pack(">QBiihHBH", first_ms + i * 1000, 0, 251234567 + i, 546789012 - i, 120, 90, 11, 54)
        body += struct.pack(">HH", 0, 10)  # event id, N total
        body += struct.pack(">H", 4) + b"".join(struct.pack(">HB", io, 1) for io in (239, 240, 21, 69))
        body += struct.pack(">H", 3) + b"".join(struct.pack(">HH", io, 12000 + io) for io in (66, 67, 24))
        body += struct.pack(">H", 2) + b"".join(struct.pack(">HI", io, 123456) for io in (16, 199))
        body += struct.pack(">H", 1) + struct.pack(">HQ", 78, 0x1122334455667788)
        body += struct.pack(">H", 0)  # NX
    body.append(RECORDS_PER_PACKET)
    return teltonika.frame_data_field(bytes(body))


def gt06_location(serial: int) -> bytes:
    content = bytes.fromhex("180b17100c2ecf027ac7eb0c46584900148f01cc00287d001fb8")
    return gt06.build_frame(0x12, content, serial)


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Items per second of ``fn`` (which returns the items it handled), best of several timed rounds."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        items = fn()
        elapsed = time.perf_counter() - start
        best = max(best, items / elapsed)
        if time.perf_counter() > deadline:
            return best


def bench_teltonika(seconds: float) -> dict[str, float]:
    base_ms = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    packets = [teltonika_8e_packet(base_ms + p * 60_000) for p in range(PACKETS)]

    def decode() -> int:
        decoder = teltonika.TeltonikaDecoder()
        n = 0
        for packet in packets:
            decoder.receive_data(packet)
            for event in decoder.events():
                n += len(event.positions)  # type: ignore[attr-defined]
        return n

    header = struct.Struct(">QBiihHBH")
    record_offsets = []
    offset = 10
    record_size = header.size + 4 + 2 + 4 * 3 + 2 + 3 * 4 + 2 + 2 * 6 + 2 + 10 + 2
    for _ in range(RECORDS_PER_PACKET):
        record_offsets.append(offset)
        offset += record_size

    def bare() -> int:
        unpack = header.unpack_from
        n = 0
        for packet in packets:
            for off in record_offsets:
                unpack(packet, off)
                n += 1
        return n

    decoded = rate(decode, seconds)
    baseline = rate(bare, seconds)
    return {
        "records_per_s": round(decoded),
        "bare_unpack_per_s": round(baseline),
        "ratio": round(decoded / baseline, 4),
    }


def bench_gt06(seconds: float) -> dict[str, float]:
    frames = [gt06_location(i) for i in range(GT06_FRAMES)]

    def decode() -> int:
        decoder = gt06.Gt06Decoder()
        n = 0
        for frame in frames:
            decoder.receive_data(frame)
            n += len(decoder.events())
        return n

    block = struct.Struct(">6BBIIBH")

    def bare() -> int:
        unpack = block.unpack_from
        for frame in frames:
            unpack(frame, 4)
        return len(frames)

    decoded = rate(decode, seconds)
    baseline = rate(bare, seconds)
    return {"frames_per_s": round(decoded), "bare_unpack_per_s": round(baseline), "ratio": round(decoded / baseline, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent on each measurement")
    args = parser.parse_args()
    result = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "teltonika_8e": bench_teltonika(args.seconds),
        "gt06_0x12": bench_gt06(args.seconds),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
