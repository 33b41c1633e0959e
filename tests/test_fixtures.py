"""Every fixture decodes to its expected events, replies and errors, however the bytes arrive."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import msgspec
import pytest
from conftest import FIXTURE_CASES, Fixture

from trackcodecs.errors import CodecError
from trackcodecs.gt06 import Gt06Decoder
from trackcodecs.oneshot import decode_capture
from trackcodecs.stream import StreamDecoder
from trackcodecs.teltonika import TeltonikaDecoder

STREAM = [f for f in FIXTURE_CASES if f.protocol in ("gt06", "teltonika")]


def test_corpus_is_present() -> None:
    protocols = {f.protocol for f in FIXTURE_CASES}
    assert protocols == {"gt06", "teltonika", "teltonika-udp"}
    assert any(not f.expected["ok"] for f in FIXTURE_CASES), "negative cases are part of the corpus"


@pytest.mark.parametrize("fixture", FIXTURE_CASES, ids=lambda f: f.id)
def test_fixture_decodes_to_expected(fixture: Fixture) -> None:
    capture = decode_capture(fixture.data, protocol=fixture.protocol, now=fixture.now,  # type: ignore[arg-type]
                             crc_policy=fixture.crc_policy)  # type: ignore[arg-type]  # fmt: skip
    assert msgspec.to_builtins(capture) == fixture.expected


def _decoder(fixture: Fixture) -> StreamDecoder:
    if fixture.protocol == "gt06":
        return Gt06Decoder(crc_policy=fixture.crc_policy)  # type: ignore[arg-type]
    return TeltonikaDecoder(crc_policy=fixture.crc_policy)  # type: ignore[arg-type]


def _run(fixture: Fixture, chunks: list[bytes]) -> tuple[list[Any], str | None]:
    """Feed ``chunks`` then EOF; return the events (as builtins) and the error reason, if any."""
    decoder = _decoder(fixture)
    error = None
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
        decoder.receive_eof()
    except CodecError as exc:
        error = exc.reason
    return msgspec.to_builtins(decoder.events()), error


@pytest.mark.parametrize("fixture", STREAM, ids=lambda f: f.id)
def test_same_result_byte_by_byte(fixture: Fixture) -> None:
    whole = _run(fixture, [fixture.data])
    assert _run(fixture, [fixture.data[i : i + 1] for i in range(len(fixture.data))]) == whole


@pytest.mark.parametrize("fixture", STREAM, ids=lambda f: f.id)
def test_same_result_at_every_split_point(fixture: Fixture) -> None:
    whole = _run(fixture, [fixture.data])
    data = fixture.data
    for cut in range(1, len(data)):
        assert _run(fixture, [data[:cut], data[cut:]]) == whole, f"split at byte {cut}"


def _glueable(f: Fixture) -> bool:
    # A login that carries a time zone changes how the next frames' device time is read, and
    # GT06 resync may join a trailing partial marker to the next capture: glue only clean, complete ones.
    events = f.expected["events"]
    return (
        f.expected["ok"]
        and f.crc_policy == "reject"
        and not any(e["type"] == "login" and e.get("tz_offset_min") is not None for e in events)
        and not (f.protocol == "gt06" and f.data[-2:] != b"\r\n")
    )


@pytest.mark.parametrize("protocol", ["gt06", "teltonika", "teltonika-udp"])
def test_glued_to_neighbours(protocol: str) -> None:
    """Each clean capture, glued to the next one of its protocol, decodes as the two apart."""
    cases = [f for f in FIXTURE_CASES if f.protocol == protocol and _glueable(f)]
    assert len(cases) >= 2
    for a, b in pairwise(cases):
        glued = decode_capture(a.data + b.data, protocol=protocol, now=a.now)  # type: ignore[arg-type]
        apart = [decode_capture(f.data, protocol=protocol, now=a.now) for f in (a, b)]  # type: ignore[arg-type]
        assert glued.ok, f"{a.id} + {b.id}: {glued.error}"
        assert glued.events == apart[0].events + apart[1].events, f"{a.id} + {b.id}"
        replies = "".join(c.reply_hex or "" for c in apart)
        assert (glued.reply_hex or "") == replies, f"{a.id} + {b.id}"
