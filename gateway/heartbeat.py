"""The channel from a worker to its supervisor: one pipe, one JSON object per line.

Messages a worker sends:

- ``{"t": "ready"}``: plugins started, listeners open; it may take traffic.
- ``{"t": "beat", "requests": N, "rss": BYTES}``: sent from the worker's event
  loop every ``interval``; if none arrives for ``server.worker_timeout`` the
  loop is stuck and the supervisor kills the worker.
- ``{"t": "recycle", "reason": "max_requests" | "max_memory"}``: please replace me.
- ``{"t": "failed", "message": "..."}``: start-up failed (for instance, a
  plugin's settings were refused); the worker exits right after.

The worker writes without blocking: a beat that does not fit is dropped
(the next one will do). End of file on the pipe means the worker is gone.
"""

from __future__ import annotations

import json
import os
from typing import Any


EXIT_BOOT_FAILED = 3  # a worker's exit status when it could not start (see the "failed" message)


class WorkerChannel:
    """The worker's end."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def send(self, kind: str, **fields: Any) -> None:
        try:
            os.write(self.fd, json.dumps({"t": kind, **fields}).encode() + b"\n")
        except (BlockingIOError, BrokenPipeError):
            pass


class SupervisorChannel:
    """The supervisor's end: reads whatever complete messages have arrived."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._partial = b""
        os.set_blocking(fd, False)

    def receive(self) -> tuple[list[dict[str, Any]], bool]:
        """(messages, closed)."""
        data = b""
        closed = False
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                closed = True
                break
            data += chunk
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        messages = []
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue
        return messages, closed

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
