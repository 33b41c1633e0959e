"""Arrival expiration without viewers and without polling (:mod:`relay.links.arrival`): records on the bus
end links whose vehicle reaches the destination, read back through the REST API as a web page would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relaykit import position
from test_links_ws import OFFICE, Links, data_of, tracking

from relay.control import ControlMessage
from relay.links.arrival import ArrivalWatch
from relay.links.model import Arrival, TrackingLink

DESTINATION = {"lat": 52.52, "lng": 13.405, "radius_m": 200}
INSIDE = {"lat": 52.5201, "lng": 13.4051}  # about 13 m from the destination
ELSEWHERE = {"lat": 48.137, "lng": 11.575, "radius_m": 200}


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def state(t: Links, link: str) -> tuple[str, str | None]:
    """The status anyone may read (the public info endpoint), and the reason the office sees."""
    info = (await t.http.get(f"/api/public/tracking-links/{link}")).json()
    stored = (await t.http.get(f"/api/tracking-links/{link}", headers=OFFICE)).json()
    return info["status"], stored.get("expired_reason")


async def until_expired(t: Links, link: str, timeout: float = 3.0) -> tuple[str, str | None]:
    async with asyncio.timeout(timeout):
        while (found := await state(t, link))[0] != "expired":
            await asyncio.sleep(0.02)
    return found


def arrivals(t: Links) -> ArrivalWatch:
    watch = t.system.relay.arrivals
    assert watch is not None
    return watch


async def test_a_link_nobody_watches_or_polls_ends_on_arrival(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create(arrival=DESTINATION)
        await t.publish(lat=52.0, lng=13.0)  # on the way
        await t.publish(**INSIDE)
        assert await until_expired(t, link) == ("expired", "arrival")
        assert t.system.relay.link_channels is not None and not t.system.relay.link_channels.watched


async def test_only_the_links_company_and_positions_since_its_creation_count(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create(arrival=DESTINATION)
        sentinel = await t.create(arrival=ELSEWHERE)  # the same vehicle, another destination
        await t.publish("a1", "globex", **INSIDE)  # the same asset id in another company
        await t.publish(**INSIDE, t=time.time() - 60)  # fixed before the link was made
        # One asset's records are checked in order: once the sentinel ended, the two above were checked.
        await t.publish(lat=ELSEWHERE["lat"], lng=ELSEWHERE["lng"])
        assert await until_expired(t, sentinel) == ("expired", "arrival")
        await asyncio.sleep(0.2)  # an arrival marked in error would have landed by now
        assert await state(t, link) == ("active", None)


async def test_a_link_made_after_its_asset_was_indexed_without_links_is_picked_up(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        await t.publish(lat=52.0, lng=13.0)
        await until(lambda: "a1" in arrivals(t).index)
        assert arrivals(t).index["a1"].links == ()  # remembered as an asset without arrival links (60 s)
        link = await t.create(arrival=DESTINATION)  # its "created" hint drops that entry
        await t.publish(**INSIDE)
        assert await until_expired(t, link) == ("expired", "arrival")


async def test_unknown_link_events_are_harmless(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        link = await t.create(arrival=DESTINATION)
        viewer = await t.viewer(link)
        await t.publish(lat=52.0, lng=13.0)
        await viewer.next("location.updated")
        await until(lambda: "a1" in arrivals(t).index)
        hint = {"uuid": link, "event": "renamed_in_a_later_version", "asset_id": "a1"}
        await t.system.control.publish(ControlMessage(kind="link_changed", data=hint))
        await t.system.control.publish(ControlMessage(kind="link_changed", data={"event": "created"}))  # no ids
        await viewer.ping()
        await until(lambda: "a1" not in arrivals(t).index)  # dropped, read again at the next record
        await t.publish(**INSIDE)
        assert data_of(await viewer.next("link.expired")) == {"reason": "arrival"}
        assert await viewer.refused() == (4004, 4004)


async def test_the_index_is_bounded_and_refreshed_after_its_ttl(tmp_path: Any) -> None:
    async with tracking(tmp_path) as t:
        service = t.system.relay.links
        assert service is not None
        watch = ArrivalWatch(service, ttl_s=0.2, max_assets=3, max_pending=2, lookups=1)
        await watch.start()
        try:
            for i in range(20):  # one lookup per asset, however many records; the rest waits with it
                watch.observe(position("a1", "acme"))
                watch.observe(position(f"other-{i}", "acme"))
            assert list(watch.pending) == ["a1", "other-0"] and len(watch.pending["a1"]) == 16
            await until(lambda: not watch.pending)
            for i in range(5):
                watch.observe(position(f"more-{i}", "acme"))
                await until(lambda: not watch.pending)
            assert len(watch.index) == 3 and "a1" not in watch.index
            # A link stored behind the service's back (no hint): found once the asset's entry is stale.
            now = datetime.now(UTC)
            link = TrackingLink(
                uuid="00000000-0000-4000-8000-000000000001", company_id="acme", asset_id="more-4",
                display_name="x", arrival=Arrival(**DESTINATION), created_at=now, updated_at=now,
            )  # fmt: skip
            await service.store.put_link(link)
            watch.observe(position("more-4", "acme", **INSIDE))  # likely still fresh: the asset had no links
            await asyncio.sleep(0.25)
            watch.observe(position("more-4", "acme", **INSIDE))  # stale by now: looked up again
            await until(lambda: not watch.pending)
            watch.observe(position("more-4", "acme", **INSIDE))
            async with asyncio.timeout(3.0):
                while (stored := await service.store.get_link(link.uuid)) is None or stored.expired_at is None:
                    await asyncio.sleep(0.01)
            assert stored.expired_reason == "arrival"
        finally:
            await watch.close()
