"""An issuer's keys from its JWKS URL: fetched with aiohttp, cached by Cache-Control, bounded.

Each worker has its own source per URL, so every limit below holds per worker.

- The first fetch starts when the worker starts; a request that needs keys before it ends
  waits for it (up to ``jwks_timeout``).
- The key set is kept for the response's ``max-age`` (``jwks_default_ttl`` without one,
  within ``jwks_min_refresh`` .. ``jwks_max_ttl``). After that, requests go on with the old
  set while one background fetch replaces it.
- A token naming an unknown ``kid`` triggers a fetch, at most once per ``jwks_min_refresh``,
  so a flood of random kids costs the identity provider one request per interval.
- A failed fetch keeps the last good set (an identity provider that is down does not lock
  everyone out) and is retried after ``jwks_min_refresh``; with no set at all, requests get
  503, not 401.
- At most one fetch runs at a time per source; the response is refused beyond
  ``jwks_max_size`` bytes or ``jwks_max_keys`` keys, and redirects are not followed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .errors import Refused
from .keys import KeySet, VerificationKey, key_from_jwk

log = logging.getLogger("plugway.auth")


class FetchFailed(Exception):
    """``result`` is the metric label: http_error, too_large, invalid or unreachable."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result


def cache_seconds(cache_control: str | None, default: float, low: float, high: float) -> float:
    """How long to keep a key set, from the response's Cache-Control."""
    seconds = default
    for directive in (cache_control or "").lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return low
        if name == "max-age" and value.strip('"').isdigit():
            seconds = float(value.strip('"'))
    return min(max(seconds, low), high)


def parse_jwks(body: bytes, max_keys: int) -> list[VerificationKey]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise FetchFailed("invalid", "the JWKS document is not JSON") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise FetchFailed("invalid", 'the JWKS document has no "keys" array')
    if len(keys) > max_keys:
        raise FetchFailed("too_large", f"the JWKS document has {len(keys)} keys, more than {max_keys}")
    usable = []
    for jwk in keys:
        try:
            usable.append(key_from_jwk(jwk))
        except ValueError as exc:
            log.info("skipping a key of a JWKS document: %s", exc)
    return usable


class JwksSource:
    """The keys behind one JWKS URL, for every issuer configuration that names it."""

    def __init__(
        self, name: str, url: str, *, session: Callable[[], aiohttp.ClientSession],
        fetched: Callable[[str, str], None],
        min_refresh: float, default_ttl: float, max_ttl: float, timeout: float, max_size: int, max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.url = url
        self.session = session
        self.fetched = fetched
        self.min_refresh = min_refresh
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.timeout = timeout
        self.max_size = max_size
        self.max_keys = max_keys
        self.clock = clock
        self.current: KeySet | None = None
        self._raw: list[Any] | None = None
        self._expires = 0.0
        self._last_attempt = -float("inf")
        self._fetch: asyncio.Task | None = None

    def start(self) -> None:
        """Begin the first fetch in the background (called when the worker starts)."""
        self._begin()

    def stop(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()

    def fresh(self) -> KeySet | None:
        if self.current is not None and self._fetch is None and self.clock() >= self._expires:
            self._begin()  # stale: serve the old set while one fetch replaces it
        return self.current

    async def candidates(self, algorithm: str, kid: str | None) -> list[VerificationKey]:
        now = self.clock()
        if self.current is None:
            if self._fetch is None and now - self._last_attempt < self.min_refresh:
                raise Refused("keys_unavailable")
            await self._wait()
            if self.current is None:
                raise Refused("keys_unavailable")
        self.fresh()
        found = self.current.candidates(algorithm, kid)
        if found or kid is None or self.current.knows(kid):
            return found
        if self._fetch is None and now - self._last_attempt < self.min_refresh:
            return found  # an unknown kid fetched again only once per interval
        await self._wait()
        return self.current.candidates(algorithm, kid)

    async def _wait(self) -> None:
        task = self._begin()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout + 1)
        except (TimeoutError, FetchFailed):
            pass  # the last good set (if any) stays; the failure was counted and logged

    def _begin(self) -> asyncio.Task:
        if self._fetch is None:
            self._last_attempt = self.clock()
            self._fetch = asyncio.get_running_loop().create_task(self._refresh())
            self._fetch.add_done_callback(_retrieve)
        return self._fetch

    async def _refresh(self) -> None:
        try:
            keys, ttl, raw = await self._download()
        except FetchFailed as failure:
            self.fetched(self.name, failure.result)
            self._expires = self.clock() + self.min_refresh
            log.warning("fetching the JWKS of issuer %s failed (%s); %s", self.name, failure,
                        "keeping the last good keys" if self.current is not None else "no keys yet")
            raise
        finally:
            self._fetch = None
        self.fetched(self.name, "ok")
        if raw != self._raw:  # an unchanged document keeps its KeySet, so cached tokens stay valid
            self.current, self._raw = KeySet(keys), raw
        self._expires = self.clock() + ttl

    async def _download(self) -> tuple[list[VerificationKey], float, list[Any]]:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with self.session().get(self.url, timeout=timeout, allow_redirects=False,
                                          headers={"Accept": "application/json"}) as response:
                if response.status != 200:
                    raise FetchFailed("http_error", f"status {response.status}")
                if (response.content_length or 0) > self.max_size:
                    raise FetchFailed("too_large", f"Content-Length {response.content_length}")
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > self.max_size:
                        raise FetchFailed("too_large", f"more than {self.max_size} bytes")
                cache_control = response.headers.get("Cache-Control")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise FetchFailed("unreachable", type(exc).__name__) from None
        keys = parse_jwks(bytes(body), self.max_keys)
        raw = sorted(json.dumps(jwk, sort_keys=True) for jwk in json.loads(body)["keys"])
        ttl = cache_seconds(cache_control, self.default_ttl, self.min_refresh, self.max_ttl)
        return keys, ttl, raw


def _retrieve(task: asyncio.Task) -> None:
    """Mark a background fetch's failure as seen (it was logged and counted)."""
    if not task.cancelled():
        task.exception()
