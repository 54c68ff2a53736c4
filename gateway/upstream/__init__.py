"""Upstreams as a worker uses them: targets with their pools, and a balancer."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..config.model import UpstreamSettings
from ..errors import NoTargetAvailable
from .balance import make_balancer
from .pool import ConnectionPool
from .resolver import Resolver

if TYPE_CHECKING:
    from ..context import RequestContext


class Target:
    """One server behind an upstream, with this worker's connections to it."""

    __slots__ = ("url", "weight", "in_flight", "pool", "host_header")

    def __init__(self, url: str, weight: int, pool: ConnectionPool, host_header: bytes) -> None:
        self.url = url
        self.weight = weight
        self.in_flight = 0
        self.pool = pool
        self.host_header = host_header

    def __repr__(self) -> str:
        return f"<Target {self.url}>"


class Upstream:
    def __init__(self, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop, resolver: Resolver) -> None:
        self.settings = settings
        self.name = settings.name
        ssl_context = _ssl_context(settings) if any(t.url.startswith("https:") for t in settings.targets) else None
        self.targets = [_make_target(t.url, t.weight, settings, loop, resolver, ssl_context) for t in settings.targets]
        self.balancer = make_balancer(settings.balance, self.targets, [t.url for t in settings.targets])
        self.hash_key = _hash_key_function(settings.hash_on)

    def choose(self, ctx: RequestContext, exclude: frozenset = frozenset()) -> Target:
        key = self.hash_key(ctx) if self.hash_key is not None else None
        target = self.balancer.pick(key, exclude)
        if target is None:
            raise NoTargetAvailable(f'no target of upstream "{self.name}" is available')
        return target

    def describe(self) -> dict:
        return {
            "balance": self.settings.balance,
            "targets": [{"url": t.url, "weight": t.weight, "in_flight": t.in_flight,
                         "open_connections": t.pool.open} for t in self.targets],
        }

    def close(self) -> None:
        for target in self.targets:
            target.pool.close()


def _make_target(
    url: str, weight: int, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop,
    resolver: Resolver, ssl_context: ssl.SSLContext | None,
) -> Target:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    default_port = parts.port is None or parts.port == (443 if secure else 80)
    host_text = f"[{host}]" if ":" in host else host
    pool = ConnectionPool(
        loop, host, port,
        resolver=None if _is_ip(host) else resolver,
        max_connections=settings.max_connections,
        connect_timeout=settings.connect_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        ssl_context=ssl_context if secure else None,
        server_hostname=host if secure and not _is_ip(host) else None,
    )
    return Target(url, weight, pool, (host_text if default_port else f"{host_text}:{port}").encode())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.tls_ca_file)
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _hash_key_function(hash_on: str | None) -> Callable[[RequestContext], str | None] | None:
    if hash_on is None:
        return None
    if hash_on == "ip":
        return lambda ctx: ctx.client_ip
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        return lambda ctx: ctx.request.headers.get(name)
    return lambda ctx: _cookie(ctx.request.headers.get("Cookie"), name)


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
