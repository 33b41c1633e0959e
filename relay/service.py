"""The relay as one object: WebSocket server, hub, native protocol, bus feed, control plane, REST service.

``fleetgate run`` builds it beside the gateway on the same bus and state
store; ``fleetgate relay`` builds it alone on Redis (several relays each read
every record). Tests build it with port 0 listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from gateway.bus.base import Bus, BusError
from gateway.state.base import StateStore
from relay.control import Control
from relay.hub import Hub
from relay.links.arrival import ArrivalWatch
from relay.links.channel import LinkChannels
from relay.links.geocode import Geocoder, open_geocoder
from relay.links.mail import LogMailer, Mailer, SmtpMailer
from relay.links.service import LinkService
from relay.links.speeds import RecentSpeeds
from relay.links.store import LinkStore
from relay.native import NativeApp
from relay.pusher import PusherHub
from relay.pusher_state import MemoryPusherState, PusherState
from relay.ratelimit import MemoryRateLimiter, RateLimiter
from relay.settings import AuthSettings, LinkSettings, PusherSettings, RelaySettings
from relay.tokens import TokenVerifier, load_secret
from relay.wsserver import WsServer

if TYPE_CHECKING:
    from relay.rest import RestServer

log = logging.getLogger(__name__)

FEED_RETRY_S = 0.5


def instance_id(settings: RelaySettings) -> str:
    """This relay's name among the instances on one Redis: configured, else ``hostname:pid``."""
    return settings.instance_id or f"{socket.gethostname()}:{os.getpid()}"


class Relay:
    def __init__(
        self,
        settings: RelaySettings,
        auth: AuthSettings,
        bus: Bus,
        store: StateStore,
        control: Control,
        *,
        rest: bool = True,
        pusher: PusherSettings | None = None,
        pusher_state: PusherState | None = None,
        links: LinkSettings | None = None,
        link_store: LinkStore | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        """``links`` on (and enabled) serves tracking links from ``link_store``, which the relay then owns
        (closes at stop), as it owns ``rate_limiter`` (default: in memory, this instance only)."""
        if links is not None and links.enabled and link_store is None:
            raise ValueError("tracking links need a link_store")
        self.settings = settings
        self.auth = auth
        self.bus = bus
        self.store = store
        self.control = control
        self.verifier = TokenVerifier(auth)
        self.with_rest = rest
        self.ws: WsServer | None = None
        self.hub: Hub | None = None
        self.native: NativeApp | None = None
        self.pusher_settings = pusher if pusher is not None else PusherSettings()
        self.pusher_state = pusher_state  # default: memory (one process)
        self.pusher: PusherHub | None = None
        self.rest: RestServer | None = None
        self.link_settings = links if links is not None and links.enabled else None
        self.link_store = link_store
        self.rate_limiter = rate_limiter
        self.links: LinkService | None = None  # built at start when links are on
        self.speeds: RecentSpeeds | None = None  # recent moving speed per asset (ETAs), fed by the hub
        self.link_channels: LinkChannels | None = None  # private-tracking-link.* on the Pusher protocol
        self.arrivals: ArrivalWatch | None = None  # ends links on arrival, watched or not
        self._geocoder: Geocoder | None = None
        self._feed: asyncio.Task[None] | None = None
        self.feed_ready = asyncio.Event()
        self.instance_id = instance_id(settings)

    async def start(self) -> None:
        s = self.settings
        await self.control.start()
        self.ws = WsServer(s, [])
        self.hub = Hub(self.ws)
        self.native = NativeApp(s, self.hub, self.bus, self.store, self.control, self.verifier)
        self.ws.apps.append(self.native)
        if self.link_settings is not None:
            self.links = self._link_service(self.link_settings, self.hub)
            self.arrivals = ArrivalWatch(self.links)
            self.hub.handlers.append(self.arrivals.observe)
            self.control.add_listener(self.arrivals.on_control)
            await self.arrivals.start()
        p = self.pusher_settings
        if p.enabled and p.apps:
            state = self.pusher_state or MemoryPusherState(self.instance_id)
            auth_secret = load_secret(self.auth) if any(not app.secret for app in p.apps) else ""
            self.pusher = PusherHub(p, auth_secret, self.hub, self.store, self.control, state, self.instance_id)
            await self.pusher.start()
            self.pusher.ping_interval_s = s.ping_interval_s
            self.ws.apps.append(self.pusher)
            if self.links is not None and self.link_settings is not None:
                ls = self.link_settings
                self.link_channels = LinkChannels(self.links, self.pusher, messages_per_s=ls.channel_messages_per_s)
                self.pusher.attach_links(self.link_channels, ls.ws_connections_per_ip)
                await self.link_channels.start()
        self._feed = asyncio.create_task(self._run_feed(), name="relay-feed")
        await self.ws.start(s.host, s.ws_port)
        if self.links is not None and not s.public_url:
            shown = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
            self.links.ws_url = f"ws://{shown}:{self.ws.port}"  # the port is known now (port 0 in tests)
        if self.with_rest:
            from relay.rest import RestContext, create_app, start_rest

            ctx = RestContext(
                self.store, self.control, self.verifier, s, self.health, pusher=self.pusher, links=self.links
            )
            self.rest = await start_rest(create_app(ctx), s.host, s.rest_port)

    def _link_service(self, settings: LinkSettings, hub: Hub) -> LinkService:
        """Tracking links: speeds fed by every record, geocoder, mailer, rate limiter, the service."""
        assert self.link_store is not None
        self.speeds = RecentSpeeds(window_s=settings.speed_window_s)
        hub.handlers.append(self.speeds.observe)
        self._geocoder = open_geocoder(settings.geocoder_url, settings.geocoder_user_agent)
        mailer: Mailer = LogMailer()
        if settings.smtp_host:
            mailer = SmtpMailer(
                settings.smtp_host,
                settings.smtp_port,
                username=settings.smtp_username or None,
                password=settings.smtp_password or None,
                tls=settings.smtp_tls,
                sender=settings.mail_from,
            )
        if self.rate_limiter is None:
            self.rate_limiter = MemoryRateLimiter()
        apps = self.pusher_settings.apps
        return LinkService(
            settings,
            self.link_store,
            self.store,
            self.control,
            mailer,
            self._geocoder,
            self.speeds,
            # Stable across restarts and shared by every instance with the same [auth] secret, never stored.
            code_secret=hmac.new(load_secret(self.auth).encode(), b"tracking-link-codes", hashlib.sha256).hexdigest(),
            ws_url=self.settings.public_url.rstrip("/"),
            app_key=apps[0].key if self.pusher_settings.enabled and apps else "",
            limiter=self.rate_limiter,
        )

    @property
    def ws_port(self) -> int:
        assert self.ws is not None
        return self.ws.port

    @property
    def rest_port(self) -> int:
        assert self.rest is not None
        return self.rest.port

    async def _run_feed(self) -> None:
        """Every committed record to the hub; after a bus failure, resume after the last record seen."""
        assert self.hub is not None
        publish = self.hub.publish
        after = "$"
        while True:
            try:
                tail = self.bus.tail(after=after)
                self.feed_ready.set()
                async for entry_id, record in tail:
                    after = entry_id
                    publish(record)
                log.info("relay feed: the bus tail ended (bus closed?); reading again")
            except BusError as exc:
                log.warning("relay feed: bus unavailable (%s); retrying", exc)
            except Exception:  # a bug must not silence the relay for good
                log.exception("relay feed: unexpected error; reading again after the last record seen")
            await asyncio.sleep(FEED_RETRY_S)

    async def _close_links(self) -> None:
        if self.links is not None:
            await self.links.close()
        if self._geocoder is not None:
            with contextlib.suppress(Exception):
                await self._geocoder.aclose()
        for closing in (self.rate_limiter, self.link_store):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing.close()

    def health(self) -> dict[str, Any]:
        ws = self.ws
        return {
            "status": "ok" if self._feed is not None and not self._feed.done() else "feed_stopped",
            "ws_connections": len(ws.connections) if ws is not None else 0,
        }

    async def stop(self, timeout: float = 2.0) -> None:
        if self.ws is not None:
            await self.ws.close(timeout)
        if self.link_channels is not None:
            with contextlib.suppress(Exception):
                await self.link_channels.close()
        if self.pusher is not None:
            with contextlib.suppress(Exception):
                await self.pusher.close()
        if self._feed is not None:
            self._feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._feed
        if self.arrivals is not None:
            with contextlib.suppress(Exception):
                await self.arrivals.close()
        if self.rest is not None:
            await self.rest.stop()
        await self._close_links()
        with contextlib.suppress(Exception):
            await self.control.close()
