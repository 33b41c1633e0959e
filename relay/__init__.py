"""fleetgate relay: the client side. WebSocket fan-out (native protocol at ``/ws``), REST, token checks.

Imports :mod:`gateway` (the bus contract, the record types, the state store,
the metrics registry); never imports :mod:`fleetgate`.

Modules:

* :mod:`relay.settings`: the ``[relay]`` and ``[auth]`` sections.
* :mod:`relay.tokens`: JWT verification (HS256 / RS256 / ES256 / JWKS) and minting for development.
* :mod:`relay.control`: control messages between relay instances (revocations, company limits);
  memory driver (embedded) and Redis driver (distributed).
* :mod:`relay.frames`: server-to-client WebSocket frames built once, written to many sockets.
* :mod:`relay.hub`: channels and fan-out; each record encoded once per channel.
* :mod:`relay.wsserver`: the asyncio protocol driving websockets' sans-I/O core, one per socket.
* :mod:`relay.native`: the native JSON protocol (drivers and offices).
* :mod:`relay.pusher`, :mod:`relay.pusher_channels`, :mod:`relay.pusher_state`: the Pusher protocol 7 at
  ``/app/{key}`` (channels, presence across instances, client events, location batching).
* :mod:`relay.pusher_auth`, :mod:`relay.pusher_http`: Pusher signatures, ``/broadcasting/auth`` and the
  Pusher HTTP API.
* :mod:`relay.links`: public tracking links.
* :mod:`relay.rest`: the REST service (Litestar on uvicorn): health, metrics, admin API.
* :mod:`relay.service`: the relay as one object (and its bus feed), started by ``fleetgate run`` / ``fleetgate relay``.
"""
