"""The pipeline: plausibility flags, ids, enrichment, moving hysteresis, odometer, device events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.pipeline import Pipeline, distance_m
from gateway.records import Device, IngestPosition, record_id
from gateway.settings import PipelineSettings
from trackcodecs import Alarm, AvlPacket, Heartbeat, Location, Position, TerminalStatus

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
DEVICE = Device(imei="356307042441013", asset_id="truck-7", company_id="acme", display_name="Truck 7")


def fix(t: datetime, lat: float = 54.0, lng: float = 25.0, speed: float = 0.0, **kw: object) -> Position:
    return Position(fix_time=t, lat=lat, lng=lng, speed_kmh=speed, course=90, satellites=9, valid=True, **kw)


def enrich(pipeline: Pipeline, p: Position, received: datetime | None = None) -> object:
    return pipeline.enrich(DEVICE, "teltonika", p, received or (p.fix_time or T0) + timedelta(seconds=2))


def test_ids_and_registry_fields() -> None:
    r = enrich(Pipeline(PipelineSettings()), fix(T0))
    assert r.id == record_id(DEVICE.imei, T0, "position") == f"{DEVICE.imei}:{int(T0.timestamp() * 1000)}:position"
    assert (r.asset_id, r.company_id, r.display_name, r.source) == ("truck-7", "acme", "Truck 7", "teltonika")
    assert r.flags == () and r.valid


def test_plausibility_flags_never_drop() -> None:
    p = Pipeline(PipelineSettings())
    received = T0
    cases = {
        "no_fix": Position(T0, 1.0, 1.0, 0.0, 0, 0, False),
        "future_time": fix(T0 + timedelta(hours=26)),
        "before_2000": fix(datetime(1999, 12, 31, tzinfo=UTC)),
        "no_time": Position(None, 1.0, 1.0, 0.0, 0, 5, False),
        "out_of_range": fix(T0, lat=91.0),
    }
    for flag, position in cases.items():
        record = p.enrich(DEVICE, "gt06", position, received)
        assert flag in record.flags, flag
        assert not record.valid, flag
    no_time = p.enrich(DEVICE, "gt06", cases["no_time"], received)
    assert no_time.fix_time == received  # stored at the receive time, flagged
    assert "future_time" not in p.enrich(DEVICE, "gt06", fix(T0 + timedelta(hours=24)), received).flags


def test_moving_hysteresis_and_ignition() -> None:
    p = Pipeline(PipelineSettings(moving_start_kmh=5, moving_stop_kmh=2))
    speeds = [0, 4, 6, 3, 2.5, 1.9, 4, 5]
    moving = [enrich(p, fix(T0 + timedelta(seconds=i), speed=s)).moving for i, s in enumerate(speeds)]
    assert moving == [False, False, True, True, True, False, False, True]
    assert enrich(p, fix(T0 + timedelta(seconds=20), speed=50, ignition=False)).moving is False


def test_odometer_from_device_or_integrated() -> None:
    p = Pipeline(PipelineSettings())
    assert enrich(p, fix(T0, odometer=123456)).odometer_m == 123456
    q = Pipeline(PipelineSettings())
    points = [(54.0, 25.0), (54.001, 25.0), (54.002, 25.0)]
    odos = [enrich(q, fix(T0 + timedelta(seconds=10 * i), lat, lng)).odometer_m for i, (lat, lng) in enumerate(points)]
    step = distance_m(54.0, 25.0, 54.001, 25.0)
    assert 110 < step < 112
    assert odos[0] == 0 and abs(odos[2] - 2 * step) <= 1
    # an out-of-order fix adds nothing; a teleport faster than max_jump_kmh adds nothing
    assert enrich(q, fix(T0 + timedelta(seconds=5), 54.5, 25.0)).odometer_m == odos[2]
    assert enrich(q, fix(T0 + timedelta(seconds=31), 60.0, 25.0)).odometer_m == odos[2]


def test_device_events_and_kinds() -> None:
    p = Pipeline(PipelineSettings())
    status = TerminalStatus(fuel_cut=False, gps_tracking=True, alarm_bits=4, charging=True, acc=True, armed=False)
    alarm = Alarm(msg_type=0x26, serial=1, alarm_code=1, alarm="sos", status=status, position=fix(T0))
    (record,) = p.records_for(DEVICE, "gt06", alarm, T0)
    assert record.kind == "alarm" and record.id.endswith(":alarm")
    assert [(e.kind, e.name, e.code) for e in record.events] == [("alarm", "sos", 1)]
    avl = AvlPacket(codec=0x8E, positions=(Position(T0, 1.0, 1.0, 0.0, 0, 5, True, 0, {247: 1}, event_io_id=247),))
    (io_record,) = p.records_for(DEVICE, "teltonika", avl, T0)
    assert [(e.kind, e.code, e.value) for e in io_record.events] == [("io", 247, 1)]
    assert p.records_for(DEVICE, "gt06", Heartbeat(msg_type=0x13, serial=1, status=status), T0) == []
    located = Location(msg_type=0x12, serial=2, position=fix(T0), crc_ok=False)
    assert "crc_mismatch" in p.records_for(DEVICE, "gt06", located, T0)[0].flags


def test_speed_limit_adds_an_overspeed_event() -> None:
    p = Pipeline(PipelineSettings())
    limited = Device(imei="1", asset_id="a", company_id="c", speed_limit_kmh=80)
    fast = p.enrich(limited, "gt06", fix(T0, speed=95), T0)
    slow = p.enrich(limited, "gt06", fix(T0 + timedelta(seconds=1), speed=60), T0)
    assert [e.name for e in fast.events] == ["overspeed"] and slow.events == ()


def test_driver_positions_run_through_the_same_steps() -> None:
    p = Pipeline(PipelineSettings())
    item = IngestPosition(source="driver", asset_id="u1", company_id="acme", fix_time=T0, received_at=T0,
                          lat=54.0, lng=25.0, speed_kmh=30.0, course=180, display_name="Ann")  # fmt: skip
    record = p.from_ingest(item)
    assert (record.asset_id, record.company_id, record.source, record.imei) == ("u1", "acme", "driver", "")
    assert (
        record.moving
        and record.display_name == "Ann"
        and record.id == f"driver:u1:{int(T0.timestamp() * 1000)}:position"
    )
