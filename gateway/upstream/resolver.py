"""Asynchronous name resolution for targets given by host name (aiodns, never a thread).

Answers are cached for their DNS TTL, at least ``MIN_TTL`` seconds (answers
from /etc/hosts carry no TTL) and at most ``MAX_TTL``. A failed lookup is an
``UpstreamUnreachable`` for the request that needed it.
"""

from __future__ import annotations

import socket

import aiodns

from ..errors import UpstreamUnreachable

MIN_TTL = 5.0
MAX_TTL = 300.0


class Resolver:
    def __init__(self, loop) -> None:
        self.loop = loop
        self._resolver: aiodns.DNSResolver | None = None
        self._cache: dict[str, tuple[float, str]] = {}

    async def resolve(self, host: str) -> str:
        cached = self._cache.get(host)
        now = self.loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        if self._resolver is None:
            self._resolver = aiodns.DNSResolver(loop=self.loop)
        try:
            result = await self._resolver.getaddrinfo(host, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as exc:
            raise UpstreamUnreachable(f"cannot resolve {host}: {exc.args[-1]}") from None
        if not result.nodes:
            raise UpstreamUnreachable(f"cannot resolve {host}: no address")
        node = result.nodes[0]
        address = node.addr[0].decode()
        ttl = min(max(float(node.ttl), MIN_TTL), MAX_TTL)
        self._cache[host] = (now + ttl, address)
        return address

    def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None
