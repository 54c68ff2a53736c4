"""Service discovery: targets from DNS, re-resolved when their TTL expires.

- ``dns://name:port``: every A/AAAA address of ``name`` is a target on ``port``, with
  the target's weight; the Host header sent is ``name:port``.
- ``srv://_http._tcp.name``: every SRV record of the lowest priority is a target on its
  own port with its own weight (0 counts as 1), the way Consul DNS and Kubernetes
  headless services publish them.

A lookup that fails keeps the last known set and is retried in ``RETRY_SECONDS``. The
upstream's ``resolver`` names the DNS servers (default: the system's).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from urllib.parse import urlsplit

import aiodns

from ..config.model import TargetSettings
from . import Upstream

log = logging.getLogger("plugway.discovery")
MIN_TTL, MAX_TTL, RETRY_SECONDS = 1.0, 300.0, 5.0


class Discovery:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.resolver = aiodns.DNSResolver(nameservers=list(upstream.settings.resolver) or None)

    async def resolve_once(self) -> float:
        """Resolve every discovered target of the upstream now; returns seconds until the next time."""
        wanted: dict[str, tuple[int, str]] = {}
        ttls = []
        for spec in self.upstream.discovered:
            targets, ttl = await self._resolve(spec)
            wanted.update(targets)
            ttls.append(ttl)
        self.upstream.replace_discovered(wanted)
        return min(max(min(ttls, default=MAX_TTL), MIN_TTL), MAX_TTL)

    async def run(self) -> None:
        while True:
            try:
                delay = await self.resolve_once()
            except aiodns.error.DNSError as exc:
                log.warning("discovery for upstream %s failed, keeping %d targets: %s", self.upstream.name,
                            len(self.upstream.targets), exc.args[-1])
                delay = RETRY_SECONDS
            await asyncio.sleep(delay)

    async def _resolve(self, spec: TargetSettings) -> tuple[dict[str, tuple[int, str]], float]:
        parts = urlsplit(spec.url)
        if parts.scheme == "dns":
            addresses, ttl = await self._addresses(parts.hostname)
            host = f"{parts.hostname}:{parts.port}"
            return {_url(address, parts.port): (spec.weight, host) for address in addresses}, ttl
        answer = await self.resolver.query_dns(parts.hostname, "SRV")
        records = [record for record in answer.answer if record.type == 33]
        lowest = min((record.data.priority for record in records), default=0)
        targets: dict[str, tuple[int, str]] = {}
        ttls = [record.ttl for record in records]
        for record in records:
            if record.data.priority != lowest:
                continue
            addresses, ttl = await self._addresses(record.data.target)
            ttls.append(ttl)
            for address in addresses:
                targets[_url(address, record.data.port)] = (max(record.data.weight, 1),
                                                           f"{record.data.target.rstrip('.')}:{record.data.port}")
        return targets, min(ttls, default=MAX_TTL)

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        result = await self.resolver.getaddrinfo(name, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)
        addresses = sorted({node.addr[0].decode() for node in result.nodes})
        return addresses, min((float(node.ttl) for node in result.nodes), default=MAX_TTL)

    def close(self) -> None:
        self.resolver.cancel()


def _url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
