"""fleetgate relay: WebSocket hub (native and Pusher protocols) and the REST API.

Imports what :mod:`gateway` exports on purpose (bus contract, record types,
state store); never imports :mod:`fleetgate`.
"""
