"""The systemd notify protocol (``sd_notify(3)``), without a dependency.

A service with ``Type=notify`` tells systemd it is ready, stopping, what it is
doing, and that it is still alive, by sending one datagram per message to the
``AF_UNIX`` socket named in ``$NOTIFY_SOCKET`` (a leading ``@`` means the
Linux abstract namespace). Outside systemd the variable is unset and every
call is a no-op returning False, so callers never need to check.

With ``WatchdogSec=`` set, systemd exports ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``) and restarts the service when no ``WATCHDOG=1`` arrives in
time; :func:`watchdog_loop` pings from the event loop at half the interval,
so a blocked loop is what stops the pings.
"""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog_interval", "watchdog_loop", "watchdog_ping"]

SEND_TIMEOUT_S = 1.0


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, or a transport we do not speak (e.g. vsock:)


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines) to systemd; True when the datagram was sent.

    Blocking for at most :data:`SEND_TIMEOUT_S` (systemd reads promptly; the
    bound only matters if it is wedged). Errors are swallowed: a lost
    notification must never take the service down.
    """
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Startup finished: listeners bound, bus reachable."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={_one_line(status_text)}")


def stopping() -> bool:
    """Shutdown began (draining in-flight commits)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """Tell the watchdog we are alive."""
    return notify("WATCHDOG=1")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is meant for us."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop() -> None:
    """Ping the watchdog every half interval, forever; return at once when there is no watchdog.

    Run it as a task next to the servers and cancel it on shutdown.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        watchdog_ping()
        await asyncio.sleep(interval)
