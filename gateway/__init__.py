"""fleetgate gateway: device listeners, sessions, the pipeline, the bus and the state store.

Imports :mod:`trackcodecs`; never imports :mod:`relay` or :mod:`fleetgate`.
"""
