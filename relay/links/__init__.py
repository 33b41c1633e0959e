"""Public tracking links: one vehicle's live position shared with people who have no account.

* :mod:`relay.links.model`: the link, session and e-mail code records; status, schedule windows,
  arrival, ETA and the public payload (what a viewer sees, and nothing else).
* :mod:`relay.links.store`: the :class:`~relay.links.store.LinkStore` contract and its two drivers
  (SQLite for embedded mode, Redis for distributed mode).
* :mod:`relay.links.geocode`: reverse geocoding (offline town table, optional Nominatim-compatible HTTP).
* :mod:`relay.links.mail`: sending verification codes (SMTP, or the log in embedded mode).
* :mod:`relay.links.rest`: management API and the public flow (info, verify, polling).
* :mod:`relay.links.channel`: the ``private-tracking-link.{uuid}`` channel on the Pusher protocol.
"""
