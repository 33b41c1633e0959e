"""The gateway's settings: every limit a named value with a safe default.

Loaded by :mod:`fleetgate.config` from one TOML file plus ``FLEETGATE_*``
environment overrides; each part of the gateway takes its own section.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ListenerSettings(_Section):
    host: str = "0.0.0.0"
    gt06_port: int = 5023
    teltonika_port: int = 5027
    teltonika_udp_port: int = 5027
    gt06: bool = True
    teltonika: bool = True
    teltonika_udp: bool = True


class LimitSettings(_Section):
    login_timeout_s: float = 30.0
    idle_timeout_s: float = 900.0
    max_frame: int = 32 * 1024
    max_connections: int = 50_000
    max_connections_per_ip: int = 200
    udp_max_inflight: int = 1000


class CodecSettings(_Section):
    gt06_crc: Literal["reject", "count"] = "reject"
    teltonika_crc: Literal["reject", "count"] = "reject"
    # GT06 0x12/0x16 carry device time: minutes east of UTC; None uses the login's time-zone field, else UTC.
    gt06_device_time_offset_min: int | None = None


class RegistrySettings(_Section):
    unknown_devices: Literal["reject", "register"] = "reject"
    default_company: str = "default"


class BusSettings(_Section):
    driver: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "fleetgate"
    positions_maxlen: int = 1_000_000
    ingest_maxlen: int = 100_000
    dedup_window_s: int = 3600
    memory_dedup_max: int = 1_000_000


class StateSettings(_Section):
    driver: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = "fleetgate.sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "fleetgate"


class CommitSettings(_Section):
    max_batch: int = 2000


class PipelineSettings(_Section):
    moving_start_kmh: float = 5.0
    moving_stop_kmh: float = 2.0
    max_future_s: float = 25 * 3600.0
    max_jump_kmh: float = 1000.0


class MqttSettings(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "fleetgate-gateway"
    username: str | None = None
    password: str | None = None
    # {imei} marks the IMEI level; "+" is used in the subscription.
    json_topic: str = "fleetgate/devices/{imei}/position"
    teltonika_topic: str = "fleetgate/devices/{imei}/teltonika"
    shared_group: str | None = None  # MQTT 5 "$share/<group>/..." so several gateways split the topics
    session_expiry_s: int = 86400


class MetricsSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 9102


class GatewaySettings(_Section):
    listeners: ListenerSettings = msgspec.field(default_factory=ListenerSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    codecs: CodecSettings = msgspec.field(default_factory=CodecSettings)
    registry: RegistrySettings = msgspec.field(default_factory=RegistrySettings)
    bus: BusSettings = msgspec.field(default_factory=BusSettings)
    state: StateSettings = msgspec.field(default_factory=StateSettings)
    commit: CommitSettings = msgspec.field(default_factory=CommitSettings)
    pipeline: PipelineSettings = msgspec.field(default_factory=PipelineSettings)
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
