"""Active health checks: one checker per host, every worker uses its results.

The worker in slot 0 (or a gateway running on its own) checks every target of the
upstreams that configure ``health_check``: a GET of ``path`` every ``interval``, passing
on one of ``statuses`` within ``timeout``. ``unhealthy_threshold`` failures in a row
mark a target down, ``healthy_threshold`` passes in a row up again. Results go to the
host-local store, where every worker reads them every half interval; a target down gets
no traffic. A replacement slot-0 worker picks the checks up after a reload (results live
three intervals in the store, so nothing flaps meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp

from ..config.model import HealthCheckSettings
from ..store import StoreUnavailable

if TYPE_CHECKING:
    from ..store import Store
    from . import Target, Upstream

log = logging.getLogger("plugway.health")


def health_key(upstream: str, url: str) -> str:
    return f"health:{upstream}:{url}"


def passes(status: int, statuses: tuple[str, ...]) -> bool:
    text = str(status)
    return any(text == wanted or wanted.endswith("xx") and text[0] == wanted[0] for wanted in statuses)


class HealthChecker:
    """Checks the targets of every upstream with ``health_check``; publishes the results."""

    def __init__(self, upstreams: list[Upstream], store: Store) -> None:
        self.upstreams = [u for u in upstreams if u.settings.health_check is not None]
        self.store = store
        self._streaks: dict[tuple[str, str], int] = {}  # >0: passes in a row, <0: failures in a row

    async def run(self) -> None:
        if not self.upstreams:
            return
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            await asyncio.gather(*(self._check_upstream(session, upstream) for upstream in self.upstreams))

    async def _check_upstream(self, session: aiohttp.ClientSession, upstream: Upstream) -> None:
        check = upstream.settings.health_check
        while True:
            targets = list(upstream.targets)
            results = await asyncio.gather(*(self._check(session, target, check) for target in targets))
            for target, ok in zip(targets, results):
                await self._record(upstream, target, ok, check)
            await asyncio.sleep(check.interval)

    async def _check(self, session: aiohttp.ClientSession, target: Target, check: HealthCheckSettings) -> bool:
        headers = {"Host": check.host or target.host_header.decode(), "User-Agent": "plugway-health-check"}
        try:
            async with session.get(target.url.rstrip("/") + check.path, headers=headers, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=check.timeout), ssl=False) as response:
                await response.read()
                return passes(response.status, check.statuses)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _record(self, upstream: Upstream, target: Target, ok: bool, check: HealthCheckSettings) -> None:
        key = (upstream.name, target.url)
        streak = self._streaks.get(key, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streaks[key] = streak
        healthy = target.healthy
        if not healthy and streak >= check.healthy_threshold:
            healthy = True
        elif healthy and -streak >= check.unhealthy_threshold:
            healthy = False
        if healthy != target.healthy:
            log.warning("target %s of upstream %s is now %s", target.url, upstream.name,
                        "healthy" if healthy else "unhealthy")
        upstream.set_health(target.url, healthy)
        try:
            await self.store.set(health_key(upstream.name, target.url), b"1" if healthy else b"0",
                                 check.interval * 3 + check.timeout)
        except StoreUnavailable:
            pass  # the other workers keep their last view until the store is back


async def watch_health(upstreams: list[Upstream], store: Store) -> None:
    """Every worker: apply the host's check results to its own view of the targets."""
    checked = [u for u in upstreams if u.settings.health_check is not None]
    if not checked:
        return
    period = min(u.settings.health_check.interval for u in checked) / 2
    while True:
        await asyncio.sleep(period)
        for upstream in checked:
            for target in list(upstream.targets):
                try:
                    value = await store.get(health_key(upstream.name, target.url))
                except StoreUnavailable:
                    break  # keep the last view; try again next period
                if value is not None:
                    upstream.set_health(target.url, value == b"1")
