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
* :mod:`relay.feed`: bus tail to hub.
* :mod:`relay.rest`: the REST service (Litestar on uvicorn): health, metrics, admin API.
* :mod:`relay.service`: the relay as one object, started by ``fleetgate run`` / ``fleetgate relay``.
"""
