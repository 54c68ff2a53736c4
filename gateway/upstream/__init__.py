"""Upstreams as a worker uses them: targets with their pools and health, and a balancer.

A target takes traffic unless it is unhealthy (active checks, ``health``) or
ejected (passive outlier detection: ``outlier_detection.consecutive_failures``
failures in a row eject it for ``base_ejection_time`` times the number of its
ejections, never more than ``max_ejection_percent`` of the targets at once).
When no target is available the answer is 503 ``no_target_available``, or,
with ``panic_mode``, every target is used anyway (Envoy's panic routing).

Targets named ``dns://name:port`` or ``srv://_http._tcp.name`` are resolved
(``discovery``) and re-resolved when their TTL expires; the set changes
without a reload, and connections to removed targets drain.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..config.model import UpstreamSettings
from ..errors import NoTargetAvailable
from .balance import make_balancer
from .budget import RetryBudget
from .pool import ConnectionPool
from .resolver import Resolver

if TYPE_CHECKING:
    from ..context import RequestContext


class Target:
    """One server behind an upstream, with this worker's connections to it and its health."""

    __slots__ = ("url", "weight", "in_flight", "pool", "host_header", "healthy", "ejected_until", "ejections",
                 "failures")

    def __init__(self, url: str, weight: int, pool: ConnectionPool, host_header: bytes) -> None:
        self.url = url
        self.weight = weight
        self.in_flight = 0
        self.pool = pool
        self.host_header = host_header
        self.healthy = True
        self.ejected_until = 0.0
        self.ejections = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"<Target {self.url}>"


class Upstream:
    def __init__(self, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop, resolver: Resolver) -> None:
        self.settings = settings
        self.name = settings.name
        self.loop = loop
        self.resolver = resolver
        self.ssl_context = _ssl_context(settings) if any("https" in t.url for t in settings.targets) else None
        self.targets: list[Target] = [
            self.make_target(t.url, t.weight) for t in settings.targets if not t.discovered
        ]
        self.discovered = [t for t in settings.targets if t.discovered]
        self.hash_key = _hash_key_function(settings.hash_on)
        self.budget = RetryBudget(settings.retries.budget / 100)
        self.in_flight = 0
        self.unavailable: frozenset[Target] = frozenset()
        self._recheck_at = math.inf
        self._rebuild()

    # --- choosing a target -----------------------------------------------------------------------

    def choose(self, ctx: RequestContext, exclude: frozenset = frozenset()) -> Target:
        """A target for the next try; ``exclude`` holds targets already tried for this request,
        ``ctx.avoid_targets`` the URLs of those a plugin keeps it away from."""
        if self.loop.time() >= self._recheck_at:
            self._refresh_availability()
        key = self.hash_key(ctx) if self.hash_key is not None else None
        unavailable = self.unavailable
        avoided: frozenset[Target] = frozenset()
        if ctx.avoid_targets:
            avoided = frozenset(t for t in self.targets if t.url in ctx.avoid_targets)
            unavailable = unavailable | avoided
        target = self.balancer.pick(key, unavailable | exclude if exclude else unavailable)
        if target is None and exclude:
            target = self.balancer.pick(key, unavailable)  # every target tried: try one again
        if target is None and self.settings.panic_mode:
            target = self.balancer.pick(key, avoided)
        if target is None:
            raise NoTargetAvailable(f'no target of upstream "{self.name}" is available')
        return target

    # --- health ----------------------------------------------------------------------------------

    def record(self, target: Target, ok: bool) -> None:
        """Passive health: a try's outcome (connect failures, timeouts, invalid answers, 5xx)."""
        if ok:
            target.failures = 0
            return
        target.failures += 1
        outlier = self.settings.outlier_detection
        if outlier.consecutive_failures and target.failures >= outlier.consecutive_failures:
            self._eject(target, outlier.base_ejection_time, outlier.max_ejection_percent)

    def _eject(self, target: Target, base: float, max_percent: int) -> None:
        now = self.loop.time()
        ejected = sum(1 for t in self.targets if t.ejected_until > now)
        if target.ejected_until > now or (ejected + 1) * 100 > max_percent * len(self.targets):
            return
        target.ejections += 1
        target.failures = 0
        target.ejected_until = now + base * target.ejections
        self._refresh_availability()

    def set_health(self, url: str, healthy: bool) -> None:
        """Active health, as the host's checker found it."""
        for target in self.targets:
            if target.url == url and target.healthy != healthy:
                target.healthy = healthy
                if healthy:
                    target.ejections = 0
                self._refresh_availability()

    def _refresh_availability(self) -> None:
        now = self.loop.time()
        self.unavailable = frozenset(t for t in self.targets if not t.healthy or t.ejected_until > now)
        upcoming = [t.ejected_until for t in self.targets if t.ejected_until > now]
        self._recheck_at = min(upcoming) if upcoming else math.inf

    # --- the target set ---------------------------------------------------------------------------

    def make_target(self, url: str, weight: int, host: str | None = None) -> Target:
        """A target for ``url``; ``host`` overrides the Host header (a discovered name's)."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        address = parts.hostname
        name = host or address
        default_port = parts.port is None or parts.port == (443 if secure else 80)
        host_text = f"[{name}]" if ":" in name else name
        pool = ConnectionPool(
            self.loop, address, port,
            resolver=None if _is_ip(address) else self.resolver,
            max_connections=self.settings.max_connections,
            connect_timeout=self.settings.connect_timeout,
            keepalive_timeout=self.settings.keepalive_timeout,
            ssl_context=self.ssl_context if secure else None,
            server_hostname=name if secure and not _is_ip(name) else None,
        )
        return Target(url, weight, pool, (host_text if default_port else f"{host_text}:{port}").encode())

    def replace_discovered(self, wanted: dict[str, tuple[int, str]]) -> None:
        """Make the discovered targets be ``wanted`` (url -> (weight, host)).

        A removed target takes no new request; its connections close as their requests end.
        """
        static = {t.url for t in self.settings.targets if not t.discovered}
        current = {(t.url, t.weight) for t in self.targets if t.url not in static}
        if current == {(url, weight) for url, (weight, _) in wanted.items()}:
            return  # unchanged: keep the balancer's state (its place in the round robin)
        kept = []
        for target in self.targets:
            if target.url in static or target.url in wanted:
                kept.append(target)
            else:
                target.pool.retire()
        known = {target.url: target for target in kept}
        for url, (weight, host) in wanted.items():
            if url in known:
                known[url].weight = weight
            else:
                kept.append(self.make_target(url, weight, host))
        self.targets = kept
        self._rebuild()

    def _rebuild(self) -> None:
        self.balancer = make_balancer(self.settings.balance, self.targets, [t.url for t in self.targets])
        self._refresh_availability()

    def describe(self) -> dict:
        now = self.loop.time()
        return {
            "balance": self.settings.balance,
            "in_flight": self.in_flight,
            "retry_budget_tokens": round(self.budget.tokens, 2),
            "targets": [{
                "url": t.url, "weight": t.weight, "in_flight": t.in_flight, "open_connections": t.pool.open,
                "healthy": t.healthy, "ejected_for_seconds": round(max(0.0, t.ejected_until - now), 1),
                "ejections": t.ejections,
            } for t in self.targets],
        }

    def close(self) -> None:
        for target in self.targets:
            target.pool.close()


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

