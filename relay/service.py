"""The relay as one object: WebSocket server, hub, native protocol, bus feed, control plane, REST service.

``fleetgate run`` builds it beside the gateway on the same bus and state
store; ``fleetgate relay`` builds it alone on Redis (several relays each read
every record). Tests build it with port 0 listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from gateway.bus.base import Bus, BusError
from gateway.state.base import StateStore
from relay.control import Control
from relay.hub import Hub
from relay.native import NativeApp
from relay.pusher import PusherHub
from relay.pusher_state import MemoryPusherState, PusherState
from relay.settings import AuthSettings, PusherSettings, RelaySettings
from relay.tokens import TokenVerifier, load_secret
from relay.wsserver import WsServer

if TYPE_CHECKING:
    from relay.rest import RestServer

log = logging.getLogger(__name__)

FEED_RETRY_S = 0.5


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
    ) -> None:
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
        self._feed: asyncio.Task[None] | None = None
        self.feed_ready = asyncio.Event()
        self.instance_id = settings.instance_id or f"{socket.gethostname()}:{os.getpid()}"

    async def start(self) -> None:
        s = self.settings
        await self.control.start()
        self.ws = WsServer(s, [])
        self.hub = Hub(self.ws)
        self.native = NativeApp(s, self.hub, self.bus, self.store, self.control, self.verifier)
        self.ws.apps.append(self.native)
        p = self.pusher_settings
        if p.enabled and p.apps:
            state = self.pusher_state or MemoryPusherState(self.instance_id)
            auth_secret = load_secret(self.auth) if any(not app.secret for app in p.apps) else ""
            self.pusher = PusherHub(p, auth_secret, self.hub, self.store, self.control, state, self.instance_id)
            await self.pusher.start()
            self.ws.apps.append(self.pusher)
        self._feed = asyncio.create_task(self._run_feed(), name="relay-feed")
        await self.ws.start(s.host, s.ws_port)
        if self.with_rest:
            from relay.rest import RestContext, create_app, start_rest

            app = create_app(RestContext(self.store, self.control, self.verifier, s, self.health, pusher=self.pusher))
            self.rest = await start_rest(app, s.host, s.rest_port)

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

    def health(self) -> dict[str, Any]:
        ws = self.ws
        return {
            "status": "ok" if self._feed is not None and not self._feed.done() else "feed_stopped",
            "ws_connections": len(ws.connections) if ws is not None else 0,
        }

    async def stop(self, timeout: float = 2.0) -> None:
        if self.ws is not None:
            await self.ws.close(timeout)
        if self.pusher is not None:
            with contextlib.suppress(Exception):
                await self.pusher.close()
        if self._feed is not None:
            self._feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._feed
        if self.rest is not None:
            await self.rest.stop()
        with contextlib.suppress(Exception):
            await self.control.close()
