"""The ``fleetgate`` command: composition of gateway and relay, configuration, and tools."""
