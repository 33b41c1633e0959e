"""MQTT ingest: devices publish to a broker, the gateway subscribes and PUBACKs only what is durable.

Delivery (docs/mqtt.md): QoS 1 on an MQTT 5 persistent session (``clean_start=False`` and a
Session Expiry Interval), so the broker keeps every message it has not had a PUBACK for,
including what arrives while the gateway is down. paho-mqtt runs with ``manual_ack=True``
and the PUBACK for a message is written only after ``Ingest.commit_*`` returned for it.
A message that can never be stored (unknown device, malformed payload, unknown topic) is
counted and PUBACKed, or the broker would resend it forever. A bus failure PUBACKs nothing:
the connection is closed, and after a back-off the resumed session gets every unacknowledged
message again (the bus drops the duplicates by record id).

PUBACKs go out in the order the messages arrived (MQTT 5 section 4.6): a message is *settled*
when its commit returned or it was dropped, and the ack queue writes PUBACKs from its head
while the head is settled. Messages of one IMEI are handled one at a time, in order (as one
TCP connection would be); different IMEIs are committed concurrently, so the group committer
batches them. The broker never has more than ``receive_maximum`` unacknowledged messages out
to us (MQTT 5 Receive Maximum): that is the backpressure, and it bounds our memory.

Threading: paho's network loop runs in its own thread (``loop_start``); everything else runs
on the asyncio loop. Only two things cross: paho callbacks hand their arguments to the loop
with ``call_soon_threadsafe`` (in order, so a CONNACK is always seen before that connection's
messages), and ``Client.ack``/``disconnect`` are called from the loop, which paho supports
(they append to its outgoing deque and wake its ``select`` through a socket pair). We chose
this over paho's socket hooks with ``add_reader``/``add_writer`` because ``connect()`` (DNS,
TCP, TLS) blocks and would have to run in a thread anyway, the hooks would then fire from that
thread, and keep-alive would need our own timer; the thread is paho's supported model.
Reconnecting is ours (``reconnect_on_failure=False``): one supervisor task opens a connection
(``reconnect()`` in an executor), runs the network thread until it ends, and waits a back-off.
Every connection has an id; a message carries the id of the connection it came on, and is
acknowledged only on that same connection: after a reconnect the broker resends it, and an
old packet id may already name a different message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from msgspec import Meta
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage, topic_matches_sub
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway import metrics
from gateway.bus.base import BusError
from gateway.ingest import Ingest
from gateway.settings import MqttSettings
from trackcodecs import CodecError, Event, Position
from trackcodecs.errors import FrameTooLarge, MalformedPayload, Truncated
from trackcodecs.teltonika import PREAMBLE, CrcPolicy, TeltonikaDecoder, decode_data_field

log = logging.getLogger(__name__)


class _AfterDisconnect(logging.Filter):
    """Drop the error paho's network thread logs when it runs once more after a DISCONNECT we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected.")


_paho_log = log.getChild("paho")
_paho_log.addFilter(_AfterDisconnect())

PROTOCOL = "mqtt"
IMEI_LEVEL = "{imei}"
MAX_IMEI_DIGITS = 20
MAX_JSON_POSITIONS = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: datetime's own limit


# --- payloads ---------------------------------------------------------------------------------


class JsonPosition(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """One fix on the JSON topic (docs/mqtt.md). Out-of-range lat/lng/course are kept and flagged by the pipeline."""

    ts: Annotated[datetime, Meta(tz=True)] | Annotated[int, Meta(ge=0, le=_MAX_EPOCH_MS)]
    lat: float
    lng: float
    speed: Annotated[float, Meta(ge=0)] = 0.0
    course: int = 0
    alt: int | None = None
    sats: Annotated[int, Meta(ge=0, le=255)] = 0
    valid: bool = True
    ignition: bool | None = None
    odometer: Annotated[int, Meta(ge=0)] | None = None
    ext_voltage: float | None = None
    battery_voltage: float | None = None

    def position(self) -> Position:
        fix_time = (
            self.ts.astimezone(UTC) if isinstance(self.ts, datetime) else _EPOCH + timedelta(milliseconds=self.ts)
        )
        return Position(
            fix_time=fix_time,
            lat=self.lat,
            lng=self.lng,
            speed_kmh=self.speed,
            course=self.course,
            satellites=self.sats,
            valid=self.valid,
            altitude=self.alt,
            ignition=self.ignition,
            external_voltage=self.ext_voltage,
            battery_voltage=self.battery_voltage,
            odometer=self.odometer,
        )


_JsonPayload = JsonPosition | Annotated[list[JsonPosition], Meta(min_length=1, max_length=MAX_JSON_POSITIONS)]
_decode_json = msgspec.json.Decoder(_JsonPayload).decode


@dataclass(frozen=True)
class Parsed:
    """What one message asks us to commit: positions (JSON topic) or decoded events (Teltonika topic)."""

    positions: tuple[Position, ...] = ()
    events: tuple[Event, ...] = ()


def parse_json(payload: bytes) -> Parsed:
    """The JSON topic's payload (one object or a list of them); raises msgspec errors."""
    decoded = _decode_json(payload)
    items = decoded if isinstance(decoded, list) else [decoded]
    return Parsed(positions=tuple(item.position() for item in items))


def parse_teltonika(payload: bytes, *, max_frame: int, crc_policy: CrcPolicy = "reject") -> tuple[Parsed, int]:
    """A codec 8/8E/16 payload, with or without the TCP envelope; returns it and the CRC mismatches counted.

    ``00 00 00 00`` first: whole TCP packets (preamble, length, data field, CRC), one or more.
    Anything else: a bare data field (codec, N1, records, N2), which has no CRC.
    """
    if payload[:4] == PREAMBLE:
        decoder = TeltonikaDecoder(max_frame=max_frame, crc_policy=crc_policy)
        decoder.receive_data(payload)
        decoder.receive_eof()
        events = decoder.events()
        if not events:
            raise MalformedPayload("no Teltonika packet in the message")
        return Parsed(events=tuple(events)), decoder.crc_mismatches
    if len(payload) > max_frame:
        raise FrameTooLarge(f"data field of {len(payload)} bytes > {max_frame}")
    if len(payload) < 3:
        raise Truncated("data field shorter than codec, N1 and N2")
    return Parsed(events=(decode_data_field(payload, len(payload), PROTOCOL),)), 0


# --- topics -----------------------------------------------------------------------------------


class TopicTemplate:
    """A configured topic such as ``fleetgate/devices/{imei}/position``: its subscription and IMEI level."""

    def __init__(self, kind: str, template: str, shared_group: str | None) -> None:
        levels = template.split("/")
        if levels.count(IMEI_LEVEL) != 1 or any(IMEI_LEVEL in lv and lv != IMEI_LEVEL for lv in levels):
            raise ValueError(f"MQTT topic {template!r} needs exactly one whole level {IMEI_LEVEL}")
        self.imei_index = levels.index(IMEI_LEVEL)
        if "#" in levels[: self.imei_index + 1] or "#" in levels[:-1]:
            raise ValueError(f"MQTT topic {template!r}: '#' may only be the last level, after {IMEI_LEVEL}")
        self.kind = kind
        self.filter = "/".join("+" if lv == IMEI_LEVEL else lv for lv in levels)
        self.subscription = f"$share/{shared_group}/{self.filter}" if shared_group else self.filter

    def imei_of(self, topic: str) -> str | None:
        """The IMEI level of ``topic`` when the topic matches this template, else None."""
        if not topic_matches_sub(self.filter, topic):
            return None
        return topic.split("/")[self.imei_index]


def _topic_of(message: MQTTMessage) -> str:
    try:
        return message.topic
    except UnicodeDecodeError:  # brokers check topics are UTF-8; should one not, the message is an unknown topic
        return ""


def valid_imei(imei: str) -> bool:
    return 0 < len(imei) <= MAX_IMEI_DIGITS and imei.isascii() and imei.isdigit()


# --- deliveries -------------------------------------------------------------------------------


@dataclass(eq=False)
class Delivery:
    """One PUBLISH as received: acknowledged (``settled``) only on the connection it came on."""

    connection: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    dup: bool
    received_at: datetime
    clock: float = field(default_factory=time.perf_counter)
    settled: bool = False


class _Dropped(Exception):
    """A message that can never be stored: counted under ``reason``, then PUBACKed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MqttIngest:
    """Subscribe to the device topics and commit what arrives; PUBACK after commit (module docstring).

    ``receive_maximum`` caps unacknowledged messages in flight to us, ``max_payload`` the size
    of one message, ``keepalive_s`` the MQTT keep-alive; ``retry_min_s``/``retry_max_s`` bound
    the reconnect back-off; ``start`` waits up to ``ready_timeout_s`` for the first subscription.
    """

    def __init__(
        self,
        settings: MqttSettings,
        ingest: Ingest,
        *,
        receive_maximum: int = 100,
        max_payload: int = 256 * 1024,
        keepalive_s: int = 30,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        ready_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.receive_maximum = receive_maximum
        self.max_payload = max_payload
        self.keepalive_s = keepalive_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.ready_timeout_s = ready_timeout_s
        self.topics = [
            TopicTemplate("json", settings.json_topic, settings.shared_group),
            TopicTemplate("teltonika", settings.teltonika_topic, settings.shared_group),
        ]
        codecs, limits = ingest.settings.codecs, ingest.settings.limits
        self._parsers: dict[str, Callable[[bytes], tuple[Parsed, int]]] = {
            "json": lambda payload: (parse_json(payload), 0),
            "teltonika": lambda payload: parse_teltonika(
                payload, max_frame=limits.max_frame, crc_policy=codecs.teltonika_crc
            ),
        }
        self.received = 0  # messages taken on (not counting those that arrived while stopping)
        self.redelivered = 0  # of those, the ones the broker flagged DUP (resent after a lost connection)
        self._client: Client | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._attempt = 0  # id of the newest connection attempt (read by paho's thread while it runs)
        self._connection: int | None = None  # id of the connection PUBACKs may go out on
        self._ended = asyncio.Event()  # the current connection is gone
        self._ready = asyncio.Event()  # subscribed at least once
        self._wake = asyncio.Event()  # interrupts the back-off sleep on stop
        self._stopping = False
        self._resumable = False  # a session exists on the broker (we connected before)
        self._bus_failed = False
        self._bus_backoff = retry_min_s
        self._net_backoff = retry_min_s
        self._unacked: deque[Delivery] = deque()
        self._queues: dict[str, deque[tuple[Delivery, Parsed]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._supervisor: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Connect and subscribe in the background; wait (bounded) until the first subscription is in place."""
        self._aio = asyncio.get_running_loop()
        self._client = self._make_client()
        self._supervisor = asyncio.create_task(self._supervise(), name="mqtt-ingest")
        try:
            await asyncio.wait_for(self._ready.wait(), self.ready_timeout_s)
        except TimeoutError:
            log.warning("MQTT broker %s:%d not ready yet; retrying in the background", *self._address)

    async def stop(self, timeout: float = 5.0) -> None:
        """Take no new message, finish the ones received (commit + PUBACK) within ``timeout``, disconnect.

        Messages received after this call, or not committed in time, are left unacknowledged:
        the broker keeps them in the session and delivers them again on the next connection.
        """
        if self._supervisor is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping = True
        workers = list(self._workers.values())
        if workers:
            _, late = await asyncio.wait(workers, timeout=timeout)
            for task in late:
                task.cancel()
        self._close_connection(abrupt=False)
        await self._end_supervisor(max(0.5, deadline - time.monotonic()))

    async def abort(self) -> None:
        """Drop the broker connection the way a crash would: no PUBACK for anything in flight, no DISCONNECT."""
        if self._supervisor is None:
            return
        self._stopping = True
        for task in list(self._workers.values()):
            task.cancel()
        self._close_connection(abrupt=True)
        await self._end_supervisor(2.0)

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def health(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "received": self.received,
            "redelivered": self.redelivered,
            "unacked": len(self._unacked),
        }

    @property
    def _address(self) -> tuple[str, int]:
        return self.settings.host, self.settings.port

    # -- the connection (asyncio side)

    def _make_client(self) -> Client:
        s = self.settings
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        client.suppress_exceptions = True  # a bug in a callback is logged; it must not kill the network thread
        client.enable_logger(_paho_log)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_subscribe = self._paho_subscribe
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
        properties.SessionExpiryInterval = s.session_expiry_s
        properties.ReceiveMaximum = self.receive_maximum
        # connect_async only records the parameters; every attempt is a blocking reconnect() in an executor.
        client.connect_async(s.host, s.port, self.keepalive_s, clean_start=False, properties=properties)
        return client

    async def _supervise(self) -> None:
        """Open a connection, run paho's network thread until it ends, back off, again; until stopped."""
        client = self._client
        assert client is not None
        loop = asyncio.get_running_loop()
        delay = 0.0
        while not self._stopping:
            if delay:
                await self._pause(delay)
                if self._stopping:
                    break
            self._attempt += 1
            self._ended.clear()
            try:
                rc = await loop.run_in_executor(None, client.reconnect)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise OSError(f"CONNECT not sent: {rc}")
            except OSError as exc:
                log.warning("MQTT connect to %s:%d failed: %s", *self._address, exc)
                delay = self._net_backoff
                self._net_backoff = min(self.retry_max_s, self._net_backoff * 2)
                continue
            if self._stopping:  # stop() came while connecting: it found no socket to close
                with contextlib.suppress(OSError):
                    client.disconnect()
                break
            client.loop_start()
            await self._connection_ended(client)
            await loop.run_in_executor(None, client.loop_stop)
            delay = self._retry_delay()

    async def _connection_ended(self, client: Client) -> None:
        """Until paho reports the disconnect (or, as a fallback, its socket is gone)."""
        while True:
            try:
                await asyncio.wait_for(self._ended.wait(), 1.0)
                return
            except TimeoutError:
                if client.socket() is None:
                    return

    def _retry_delay(self) -> float:
        if self._bus_failed:
            self._bus_failed = False
            delay = self._bus_backoff
            self._bus_backoff = min(self.retry_max_s, self._bus_backoff * 2)
            return delay
        delay = self._net_backoff
        self._net_backoff = min(self.retry_max_s, self._net_backoff * 2)
        return delay

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _close_connection(self, *, abrupt: bool) -> None:
        """Stop PUBACKing on the current connection and close it (DISCONNECT, or a bare TCP shutdown)."""
        self._connection = None
        self._unacked.clear()
        self._wake.set()
        client = self._client
        if client is None:
            return
        try:
            sock = client.socket()
            if abrupt and isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)  # paho's thread sees EOF and ends; nothing more is written
            elif sock is not None:
                client.disconnect()  # queued after every PUBACK already written
        except OSError as exc:
            log.debug("closing the MQTT connection: %s", exc)

    async def _end_supervisor(self, timeout: float) -> None:
        assert self._supervisor is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._supervisor), timeout)
        except TimeoutError:
            log.warning("MQTT connection did not close within %.1f s", timeout)
            self._close_connection(abrupt=True)
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            if self._client is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)

    # -- paho callbacks (paho's network thread): hand everything to the event loop

    def _hand_off(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._aio
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is already closed: nothing left to do
                loop.call_soon_threadsafe(callback, *args)

    def _paho_connect(
        self, client: Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, props: Properties | None
    ) -> None:
        if not reason.is_failure:
            # Subscribing on every CONNACK is idempotent; it recreates the subscriptions when the
            # session was gone. Retained messages come only with a new subscription.
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            client.subscribe([(t.subscription, options) for t in self.topics])
        self._hand_off(self._on_connected, self._attempt, str(reason), reason.is_failure, flags.session_present)

    def _paho_disconnect(
        self, client: Client, userdata: Any, flags: DisconnectFlags, reason: ReasonCode, props: Properties | None
    ) -> None:
        self._hand_off(self._on_disconnected, self._attempt, str(reason))

    def _paho_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        delivery = Delivery(
            connection=self._attempt,
            mid=message.mid,
            qos=message.qos,
            topic=_topic_of(message),
            payload=bytes(message.payload),
            dup=bool(message.dup),
            received_at=datetime.now(UTC),
        )
        self._hand_off(self._on_delivery, delivery)

    def _paho_subscribe(
        self, client: Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Properties | None
    ) -> None:
        self._hand_off(self._on_subscribed, [(str(r), r.is_failure) for r in reasons])

    # -- the same events on the event loop

    def _on_connected(self, attempt: int, reason: str, failed: bool, session_present: bool) -> None:
        if failed:
            log.error("MQTT broker %s:%d refused the connection: %s", *self._address, reason)
            return
        if attempt != self._attempt or self._stopping:
            return
        self._connection = attempt
        self._unacked.clear()
        self._net_backoff = self.retry_min_s
        if not session_present and self._resumable:
            log.warning("MQTT session was not resumed (expired?): messages published meanwhile may be lost")
        self._resumable = True
        log.info("MQTT connected to %s:%d (session present: %s)", *self._address, session_present)

    def _on_disconnected(self, attempt: int, reason: str) -> None:
        if attempt != self._attempt:
            return
        if self._connection is not None:
            log.warning("MQTT connection to %s:%d lost: %s", *self._address, reason)
        self._connection = None
        self._unacked.clear()
        self._ended.set()

    def _on_subscribed(self, reasons: list[tuple[str, bool]]) -> None:
        refused = [(t.subscription, r) for t, (r, failed) in zip(self.topics, reasons, strict=False) if failed]
        if refused:
            log.error("MQTT subscriptions refused: %s", refused)
        else:
            self._ready.set()

    def _on_delivery(self, delivery: Delivery) -> None:
        """A message arrived: parse it, then settle it at once (drop) or queue it behind its IMEI's earlier ones."""
        if self._stopping or delivery.connection != self._connection:
            return  # not acknowledged: the broker resends it on the next connection
        self._unacked.append(delivery)
        self.received += 1
        if delivery.dup:
            self.redelivered += 1
        try:
            imei, parsed = self._parse(delivery)
        except _Dropped as drop:
            metrics.DECODE_ERRORS.labels(protocol=PROTOCOL, reason=drop.reason).inc()
            self._settle(delivery)
            return
        queue = self._queues.setdefault(imei, deque())
        queue.append((delivery, parsed))
        if imei not in self._workers:
            self._workers[imei] = asyncio.create_task(self._drain(imei, queue), name="mqtt-device")

    def _parse(self, delivery: Delivery) -> tuple[str, Parsed]:
        """The IMEI and content of a message; raises :class:`_Dropped` for what can never be stored."""
        for topic in self.topics:
            imei = topic.imei_of(delivery.topic)
            if imei is not None:
                break
        else:
            raise _Dropped("unknown_topic")
        metrics.MQTT_MESSAGES.labels(kind=topic.kind).inc()
        if not valid_imei(imei):
            raise _Dropped("bad_imei")
        if len(delivery.payload) > self.max_payload:
            raise _Dropped("too_large")
        try:
            parsed, crc_mismatches = self._parsers[topic.kind](delivery.payload)
        except msgspec.ValidationError:
            raise _Dropped("bad_schema") from None
        except msgspec.DecodeError:
            raise _Dropped("bad_json") from None
        except CodecError as exc:
            if exc.reason == "bad_crc":
                metrics.CRC_MISMATCHES.labels(protocol=PROTOCOL).inc()
            raise _Dropped(exc.reason) from None
        except Exception:  # the payload made our own code fail: it would every time, so it is dropped
            log.exception("unexpected error decoding an MQTT %s payload", topic.kind)
            raise _Dropped("internal_error") from None
        if crc_mismatches:
            metrics.CRC_MISMATCHES.labels(protocol=PROTOCOL).inc(crc_mismatches)
        for event in parsed.events:
            metrics.FRAMES.labels(protocol=PROTOCOL, type=event.__struct_config__.tag).inc()
        return imei, parsed

    async def _drain(self, imei: str, queue: deque[tuple[Delivery, Parsed]]) -> None:
        """Commit one IMEI's messages in arrival order; the first failure closes the connection."""
        try:
            while queue:
                delivery, parsed = queue[0]
                if delivery.connection == self._connection and await self._commit(imei, delivery, parsed):
                    self._settle(delivery)
                queue.popleft()
        finally:
            self._queues.pop(imei, None)
            self._workers.pop(imei, None)

    async def _commit(self, imei: str, delivery: Delivery, parsed: Parsed) -> bool:
        """True when the message may be PUBACKed: committed, or from a device that is not registered."""
        try:
            device = await self.ingest.device_for(imei, PROTOCOL)
            if device is None:
                return True  # counted by device_for; it can never be stored, so it is dropped
            if parsed.positions:
                await self.ingest.commit_positions(device, PROTOCOL, parsed.positions, delivery.received_at)
            for event in parsed.events:
                await self.ingest.commit_event(device, PROTOCOL, event, delivery.received_at)
        except BusError as exc:
            self._commit_failed(delivery, exc.reason)
            return False
        except Exception:  # the state store or our own code: not the payload's fault, so it is retried
            log.exception("unexpected error committing an MQTT message")
            self._commit_failed(delivery, "internal_error")
            return False
        self._bus_backoff = self.retry_min_s
        return True

    def _commit_failed(self, delivery: Delivery, reason: str) -> None:
        """No PUBACK for this message or any after it: reconnect so the broker resends them all."""
        if delivery.connection != self._connection:
            return
        log.warning("MQTT commit failed (%s): reconnecting so the broker resends what is unacknowledged", reason)
        self._bus_failed = True
        self._close_connection(abrupt=False)

    def _settle(self, delivery: Delivery) -> None:
        """Mark ``delivery`` done and write every PUBACK now due, in arrival order."""
        delivery.settled = True
        client, unacked = self._client, self._unacked
        while unacked and unacked[0].settled:
            head = unacked.popleft()
            if client is None or head.connection != self._connection:
                continue
            try:
                client.ack(head.mid, head.qos)
            except OSError as exc:  # the connection is going away; the broker resends
                log.debug("PUBACK not written: %s", exc)
                continue
            metrics.ACK_LATENCY.labels(protocol=PROTOCOL).observe(time.perf_counter() - head.clock)
