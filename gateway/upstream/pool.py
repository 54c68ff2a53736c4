"""Keep-alive connections to one target, per worker.

At most ``max_connections`` connections are open at once; a request that
finds them all busy waits (first come, first served) until one is released
or ``connect_timeout`` passes, then fails with 503 ``upstream_busy``. Idle
connections are reused newest first and closed after ``keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from ..config.units import Duration
from ..errors import UpstreamBusy, UpstreamTimeout, UpstreamUnreachable


class ConnectFailure(UpstreamUnreachable):
    """No connection could be made (refused, unreachable, DNS): nothing reached the target."""


class HandshakeFailure(ConnectFailure):
    """The TCP connection was made but TLS failed: the target did a handshake's work."""


class ConnectTimeout(UpstreamTimeout):
    """The connection was not made within connect_timeout: the target may be overloaded (its
    accept queue full, so it drops SYNs), or unreachable."""

    message = "connecting to the upstream timed out"
from .connection import UpstreamConnection
from .resolver import Resolver


class ConnectionPool:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        *,
        resolver: Resolver | None,
        max_connections: int,
        connect_timeout: float,
        keepalive_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.resolver = resolver
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.idle: deque[UpstreamConnection] = deque()
        self.open = 0
        self.opened_total = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self.retired = False

    async def acquire(self, connect_timeout: float | None = None) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange, and whether it was reused."""
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection, True
        timeout = connect_timeout or self.connect_timeout
        if self.open < self.max_connections:
            return await self._connect(timeout), False
        return await self._wait_for_release(timeout)

    def release(self, connection: UpstreamConnection) -> None:
        if self.retired:
            connection.close()
            return
        if self._hand_over(connection):
            return
        connection.idle_since = self.loop.time()
        self.idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_timeout, self._sweep)

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed: stop counting it, and let a waiter open a new one."""
        self.open -= 1
        try:
            self.idle.remove(connection)
        except ValueError:
            pass
        self._hand_over(None)

    def _hand_over(self, connection: UpstreamConnection | None) -> bool:
        """Give a released connection (or, with None, room for a new one) to the first waiter."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    def retire(self) -> None:
        """The target left the upstream: close idle connections now, busy ones when released."""
        self.retired = True
        self.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _connect(self, timeout: float) -> UpstreamConnection:
        self.open += 1
        try:
            async with asyncio.timeout(timeout):
                host = self.host if self.resolver is None else await self.resolver.resolve(self.host)
                _, connection = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), host, self.port,
                    ssl=self.ssl_context, server_hostname=self.server_hostname if self.ssl_context else None,
                )
        except TimeoutError:
            self.open -= 1
            raise ConnectTimeout(
                f"connecting to the upstream took longer than connect_timeout ({Duration(timeout)})") from None
        except ssl.SSLError as exc:
            self.open -= 1
            raise HandshakeFailure(f"TLS with the upstream failed: {exc.reason or 'handshake error'}") from None
        except OSError as exc:
            self.open -= 1
            raise ConnectFailure(f"the upstream refused the connection ({exc.strerror or exc})") from None
        except UpstreamUnreachable as exc:  # the name did not resolve
            self.open -= 1
            raise ConnectFailure(exc.message) from None
        except BaseException:
            self.open -= 1
            raise
        self.opened_total += 1
        return connection

    async def _wait_for_release(self, timeout: float) -> tuple[UpstreamConnection, bool]:
        waiter: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                connection = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._pass_on(waiter.result())
            if isinstance(exc, TimeoutError):
                raise UpstreamBusy() from None
            raise
        if connection is None:  # a connection closed, so there is room for a new one
            return await self._connect(timeout), False
        return connection, True

    def _pass_on(self, connection: UpstreamConnection | None) -> None:
        """A waiter was handed something but gave up: hand it on rather than lose it."""
        if connection is not None:
            self.release(connection)
        else:
            self._hand_over(None)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.keepalive_timeout
        while self.idle and self.idle[0].idle_since <= deadline:
            self.idle.popleft().close()
        if self.idle:
            delay = self.idle[0].idle_since + self.keepalive_timeout - self.loop.time()
            self._sweeper = self.loop.call_later(max(delay, 0.05), self._sweep)
