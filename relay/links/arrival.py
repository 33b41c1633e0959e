"""Arrival expiration for every link, watched or not: records checked against the links that end on arrival.

Viewers (:mod:`relay.links.channel`) and polling see a link's positions only while someone looks; a
vehicle that passes through the destination while nobody does must end its link all the same. An
:class:`ArrivalWatch` is a hub record handler with an index, per asset id, of the links that may still
end on arrival (``arrival`` set, enabled, not expired), read with
:meth:`~relay.links.store.LinkStore.links_for_asset`:

* filled lazily: the first record of an asset queues a lookup, which one of ``lookups`` worker tasks
  runs (one lookup per asset at a time; the synchronous record handler never waits). Records arriving
  meanwhile wait with it (the last ``MAX_HELD``) and are checked when it answers;
* an asset without such links gets an empty entry, so a record costs a dict lookup and a clock read;
* an entry older than ``ttl_s`` keeps answering while it is looked up again (a safety net for a lost
  hint); a failed lookup is retried after ``retry_s``;
* every ``link_changed`` hint, whatever its event (``created`` included, and events this module does
  not know), drops the entries of the assets it names (``asset_id``, ``previous_asset_id``); a lookup
  the hint overtook runs again;
* at most ``max_assets`` entries (the oldest loaded is dropped first) and ``max_pending`` assets
  waiting for a lookup: beyond it a record of an unknown asset is not checked, its next one is.

A record ends a link (:meth:`~relay.links.service.LinkService.mark_expired`, ``"arrival"``) when it
names the link's company, was fixed at or after the link's ``created_at`` (not a stale one at the
depot) and lies within the radius, while the link is enabled and not expired by time, outside its
schedule window too: the schedule decides when the vehicle is shown, not whether it arrived. Every
relay instance reads every record, so several may mark the same link: ``mark_expired`` is idempotent,
and its ``expired`` hint closes the link's viewers on every instance.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.records import TrackedPosition
from relay.control import ControlMessage
from relay.links import model
from relay.links.model import Status, TrackingLink
from relay.links.service import LINK_CHANGED
from relay.links.store import LinkStoreError

if TYPE_CHECKING:
    from relay.links.service import LinkService

log = logging.getLogger(__name__)

TTL_S = 60.0
RETRY_S = 5.0
MAX_ASSETS = 50_000
MAX_PENDING = 10_000
LOOKUPS = 4
MAX_HELD = 16  # records of one asset kept while its lookup runs (a lookup takes milliseconds)
_HINTED_ASSETS = ("asset_id", "previous_asset_id")
_MAY_ARRIVE: frozenset[Status] = frozenset({"active", "outside_schedule"})


@dataclass(slots=True)
class _Entry:
    """The links of one asset that may end on arrival (often none), and until when they are trusted."""

    links: tuple[TrackingLink, ...]
    fresh_until: float  # loop time


class ArrivalWatch:
    """Ends links on arrival from the records of a :class:`~relay.hub.Hub` (register :meth:`observe` as a
    handler and :meth:`on_control` as a control listener); limits as in the module docstring."""

    def __init__(
        self,
        service: LinkService,
        *,
        ttl_s: float = TTL_S,
        retry_s: float = RETRY_S,
        max_assets: int = MAX_ASSETS,
        max_pending: int = MAX_PENDING,
        lookups: int = LOOKUPS,
    ) -> None:
        if max_assets < 1 or max_pending < 1 or lookups < 1:
            raise ValueError("max_assets, max_pending and lookups must be at least 1")
        self.service = service
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.max_assets = max_assets
        self.max_pending = max_pending
        self.lookups = lookups
        self.index: dict[str, _Entry] = {}  # asset id -> links, in the order loaded (oldest first)
        self.pending: dict[str, collections.deque[TrackedPosition]] = {}  # asset id -> records held for its lookup
        self._overtaken: set[str] = set()  # assets whose running lookup a hint made stale
        self._queue: asyncio.Queue[str] = asyncio.Queue()  # as long as ``pending`` at most
        self._arriving: set[str] = set()  # uuids of links being marked
        self._failing = False  # lookups fail (logged once until one succeeds)
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()

    async def start(self) -> None:
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._look_up_queued(), name=f"link-arrival-lookup-{i}")
                for i in range(self.lookups)
            ]

    async def close(self) -> None:
        tasks = [*self._workers, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._workers = []

    # --- the hub's and the control plane's hooks -----------------------------------------------------

    def observe(self, record: TrackedPosition) -> None:
        """Check ``record`` against its asset's links, or hold it for their lookup (a hub handler: no I/O)."""
        asset = record.asset_id
        entry = self.index.get(asset)
        if entry is None:
            held = self.pending.get(asset)
            if held is not None:
                held.append(record)
            else:
                self._queue_lookup(asset, record)
            return
        if entry.links:
            self._check(entry.links, record)
        if entry.fresh_until <= self.loop.time() and asset not in self.pending:
            self._queue_lookup(asset, None)

    def on_control(self, message: ControlMessage) -> None:
        """Forget the assets a ``link_changed`` hint names, whatever its event (a control listener)."""
        if message.kind != LINK_CHANGED:
            return
        for key in _HINTED_ASSETS:
            asset = message.data.get(key)
            if isinstance(asset, str):
                self.index.pop(asset, None)
                if asset in self.pending:
                    self._overtaken.add(asset)

    # --- lookups ------------------------------------------------------------------------------------------

    def _queue_lookup(self, asset: str, record: TrackedPosition | None) -> None:
        if len(self.pending) >= self.max_pending:
            return  # backpressure: the asset's next record asks again
        held: collections.deque[TrackedPosition] = collections.deque(maxlen=MAX_HELD)
        if record is not None:
            held.append(record)
        self.pending[asset] = held
        self._queue.put_nowait(asset)

    async def _look_up_queued(self) -> None:
        while True:
            asset = await self._queue.get()
            try:
                links = await self._links_of(asset)
            except Exception as exc:  # the store is down, or a bug: this worker must go on either way
                self._lookup_failed(exc)
                links = None
            finally:
                held = self.pending.pop(asset, ())
                self._overtaken.discard(asset)
            if links is None:
                previous = self.index.get(asset)
                self._remember(asset, previous.links if previous is not None else (), self.retry_s)
                continue
            if self._failing:
                self._failing = False
                log.info("tracking link arrivals: the link store answers again")
            self._remember(asset, links, self.ttl_s)
            for record in held:
                self._check(links, record)

    async def _links_of(self, asset: str) -> tuple[TrackingLink, ...]:
        """The asset's links that may end on arrival; read again while hints overtake the read."""
        while True:
            self._overtaken.discard(asset)
            found = await self.service.store.links_for_asset(asset)
            if asset not in self._overtaken:
                return tuple(link for link in found if _may_arrive(link))

    def _lookup_failed(self, exc: Exception) -> None:
        if self._failing:
            return
        self._failing = True
        if isinstance(exc, LinkStoreError):
            log.warning("tracking link arrivals: link store unavailable (%s); retrying every %s s", exc, self.retry_s)
        else:
            log.error("tracking link arrivals: lookup failed", exc_info=exc)

    def _remember(self, asset: str, links: tuple[TrackingLink, ...], for_s: float) -> None:
        self.index.pop(asset, None)  # (re)inserted last: the oldest loaded is the first dropped
        while len(self.index) >= self.max_assets:
            del self.index[next(iter(self.index))]
        self.index[asset] = _Entry(links, self.loop.time() + for_s)

    # --- arrival ------------------------------------------------------------------------------------------

    def _check(self, links: Iterable[TrackingLink], record: TrackedPosition) -> None:
        for link in links:
            if (
                link.uuid not in self._arriving
                and record.company_id == link.company_id
                and record.fix_time >= link.created_at
                and model.arrived(link, record)
                and self.service.status(link) in _MAY_ARRIVE
            ):
                self._arriving.add(link.uuid)
                task = asyncio.create_task(self._arrive(link))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _arrive(self, link: TrackingLink) -> None:
        try:
            await self.service.mark_expired(link, "arrival")
        except Exception as exc:  # store or control down: the next record within the radius tries again
            log.warning("tracking link %s: arrival not recorded (%s)", link.uuid, exc)
        else:
            entry = self.index.get(link.asset_id)
            if entry is not None:  # done here; the expired hint also drops the entry, maybe later
                entry.links = tuple(other for other in entry.links if other.uuid != link.uuid)
        finally:
            self._arriving.discard(link.uuid)


def _may_arrive(link: TrackingLink) -> bool:
    return link.arrival is not None and link.enabled and link.expired_at is None
