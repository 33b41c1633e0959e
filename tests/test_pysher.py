"""The real pysher client (PyPI, protocol 6, a thread on websocket-client) against an in-process relay.

pysher runs its own thread, so the relay keeps running in the test's event loop; the test waits for
pysher's callbacks through thread-safe queues, off the loop (``asyncio.to_thread``). pysher signs
private and presence channels itself when given the app ``secret`` (pysher.py ``_generate_auth_token``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pysher
import pytest
from relaykit import position, running_system

from relay.settings import PusherAppSettings, PusherSettings

APP = PusherAppSettings(id="1", key="app-key", secret="app-secret")


class Inbox:
    """pysher callbacks put ``(name, data)`` here; the test takes them off the event loop."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def callback(self, name: str) -> Any:
        return lambda data, *args, **kwargs: self.items.put((name, data))

    async def expect(self, name: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got, data = await asyncio.to_thread(self.items.get, True, max(0.01, deadline - time.monotonic()))
            if got == name:
                return data


@pytest.fixture
async def relay_port(tmp_path: Any) -> AsyncIterator[int]:
    async with running_system(tmp_path, pusher=PusherSettings(apps=[APP])) as system:
        yield system.relay.ws_port


async def connected(port: int, inbox: Inbox, **options: Any) -> pysher.Pusher:
    client = pysher.Pusher(
        APP.key, secure=False, custom_host="127.0.0.1", port=port, secret=APP.secret, log_level=logging.WARNING,
        **options,
    )  # fmt: skip
    # pysher's thread waits in select() for ping_timeout (100 s) before it notices its own disconnect;
    # with no ping_interval, websocket-client uses it only as that wait, so a short one ends it promptly.
    client.connection.socket_kwargs["ping_timeout"] = 0.2
    client.connection.bind("pusher:connection_established", inbox.callback("established"))
    client.connect()
    await inbox.expect("established")
    return client


async def disconnected(client: pysher.Pusher) -> None:
    await asyncio.to_thread(client.disconnect, 3)
    assert not client.connection.is_alive()


async def test_pysher_connects_with_protocol_6(relay_port: int) -> None:
    inbox = Inbox()
    client = await connected(relay_port, inbox)
    try:
        assert "protocol=6" in client.url and client.connection.state == "connected"
        assert re.fullmatch(r"\d+\.\d+", client.connection.socket_id)
    finally:
        await disconnected(client)


async def test_pysher_receives_location_updates_on_a_private_channel(tmp_path: Any) -> None:
    inbox = Inbox()
    async with running_system(tmp_path, pusher=PusherSettings(apps=[APP])) as system:
        client = await connected(system.relay.ws_port, inbox)
        try:
            channel = client.subscribe("private-account.acme")  # signed by pysher with the app secret
            channel.bind("pusher_internal:subscription_succeeded", inbox.callback("subscribed"))
            channel.bind("location.updated", inbox.callback("location"))
            assert await inbox.expect("subscribed") == "{}"
            await system.publish([position("a1", "acme", lat=52.5, lng=13.4), position("b1", "globex")])
            update = json.loads(await inbox.expect("location"))
            assert (update["assetId"], update["lat"], update["lng"]) == ("a1", 52.5, 13.4)
        finally:
            await disconnected(client)


async def test_pysher_presence_and_subscription_error(relay_port: int) -> None:
    inbox = Inbox()
    client = await connected(relay_port, inbox, user_data={"user_id": "u1", "user_info": {"name": "Ann"}})
    try:
        presence = client.subscribe("presence-account.acme")
        presence.bind("pusher_internal:subscription_succeeded", inbox.callback("presence"))
        members = json.loads(await inbox.expect("presence"))["presence"]
        assert (members["ids"], members["hash"]) == (["u1"], {"u1": {"name": "Ann"}})
        wrong = client.subscribe("private-account.globex", auth=f"{APP.key}:{'0' * 64}")
        wrong.bind("pusher:subscription_error", inbox.callback("refused"))
        assert (await inbox.expect("refused"))["status"] == 401
        assert client.connection.state == "connected"  # the socket stays open
    finally:
        await disconnected(client)
