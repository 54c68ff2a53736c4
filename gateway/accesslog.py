"""One JSON line per request on stdout, for journald or any log collector.

Fields: ``time`` (RFC 3339, UTC), ``request_id``, ``client_ip``, ``method``,
``path`` (canonical), ``route``, ``upstream``, ``target``, ``status``,
``bytes_in``, ``bytes_out``, ``duration_ms``, ``upstream_ms``, and when set
``consumer``, ``error`` (the gateway error code) and any fields plugins put
in ``ctx.log``. Lines written during one event-loop tick go out in a single
write, after the responses of that tick.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import RequestContext


class AccessLog:
    """Writes to stdout, or to ``path`` (opened for appending, reopened by ``reopen`` on SIGUSR1)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str | None = None) -> None:
        self.loop = loop
        self.path = path
        self.fd = self._open() if path else 1
        self._lines: list[bytes] = []

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """After logrotate moved the file: flush to the old one, then write to a new one."""
        if self.path is None:
            return
        self.flush()
        old, self.fd = self.fd, self._open()
        os.close(old)

    def record(self, ctx: RequestContext, duration: float) -> None:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z",
            "request_id": ctx.request_id,
            "client_ip": ctx.client_ip,
            "method": ctx.method,
            "path": ctx.path,
            "route": ctx.route.name if ctx.route is not None else None,
            "upstream": ctx.upstream.name if ctx.upstream is not None else None,
            "target": ctx.target.url if ctx.target is not None else None,
            "status": ctx.status,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "duration_ms": round(duration * 1000, 3),
            "upstream_ms": round(ctx.upstream_seconds * 1000, 3) if ctx.upstream_seconds is not None else None,
        }
        if ctx.consumer is not None:
            entry["consumer"] = ctx.consumer.id
        if ctx.error is not None:
            entry["error"] = getattr(ctx.error, "code", type(ctx.error).__name__)
        if ctx.log:
            entry.update(ctx.log)
        if not self._lines:
            self.loop.call_soon(self.flush)
        self._lines.append(json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n")

    def flush(self) -> None:
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            try:
                os.write(self.fd, data)
            except OSError:
                pass  # stdout gone (collector restarted): drop the lines, never the requests
