"""The sd_notify protocol: a few lines over the datagram socket systemd names in NOTIFY_SOCKET.

Only the supervisor (the unit's main process) sends: ``READY=1`` once every
worker is ready, ``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload starts
and ``READY=1`` when it ends (systemd 253's ``Type=notify-reload`` needs both;
252 ignores them harmlessly), ``STOPPING=1``, ``STATUS=...`` lines, and
``WATCHDOG=1`` when the unit sets ``WatchdogSec``.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``fields`` (``KEY=VALUE`` strings) in one datagram; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000
