"""A shared HTTP cache (RFC 9111) for Plugway routes; see README.md for the settings.

Priority 100, the lowest bundled one: a request is looked up only after authentication,
authorization and rate limits have let it through, and a hit still goes out through every
other plugin's response phase (CORS, security headers, compression...). ``on_response``
runs first in the response phase, so what is stored is the upstream's answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from gateway import Duration, PluginDeclaration, Size, hookimpl, setting

from . import admin, serving
from .purge import PurgeFollower
from .serving import NAME, CacheState
from .stores import MemoryStore, SharedStore

PRIORITY = 100
ALLOWED_METHODS = ("GET", "HEAD")
DEFAULT_BYPASS_HEADERS = (
    "X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
    "X-Forwarded-Scheme", "X-Forwarded-Server", "X-Forwarded-Port", "X-Forwarded-Prefix", "X-Host", "X-Original-Host",
)
SHARED_OBJECT_LIMIT = 8 * 1024 * 1024  # the local store takes frames up to 16 MiB


def _methods(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(item, str) for item in raw):
        raise ValueError('must be a non-empty array of methods, such as ["GET", "HEAD"]')
    methods = tuple(dict.fromkeys(item.upper() for item in raw))
    if not set(methods) <= set(ALLOWED_METHODS) or "GET" not in methods:
        raise ValueError('may be ["GET"] or ["GET", "HEAD"]: the key holds no request body, and HEAD is '
                         "answered from GET entries")
    return methods


def _statuses(raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, int) and not isinstance(item, bool) for item in raw):
        raise ValueError("must be an array of status codes")
    for status in raw:
        if not 200 <= status <= 599 or status in (206, 304):
            raise ValueError(f"{status} cannot be stored (a final status other than 206 and 304)")
    return tuple(raw)


def _key_extra(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ValueError("must be an array of key parts")
    for item in raw:
        kind, _, name = item.partition(":")
        if not (item in ("consumer", "version") or kind in ("header", "cookie") and name.strip()):
            raise ValueError(f"{item!r} must be consumer, version, header:NAME or cookie:NAME")
    return tuple(raw)


def _header_names(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, str) and item.strip() for item in raw):
        raise ValueError("must be an array of header names")
    return tuple(raw)


@dataclass(frozen=True)
class CacheSettings:
    store: Literal["memory", "shared"] = setting(
        "memory", doc="memory: this worker's own LRU; shared: the gateway's store (every worker of the host, or "
                      "every host with Redis).",
    )
    methods: tuple[str, ...] = setting(ALLOWED_METHODS, parse=_methods,
                                       doc='Methods answered from the cache: ["GET", "HEAD"] or ["GET"].')
    statuses: tuple[int, ...] = setting(
        (200, 203, 204, 300, 301, 308, 404, 410), parse=_statuses,
        doc="Statuses that may be stored; any other is never stored, even if marked cacheable.",
    )
    default_ttl: Duration = setting(
        Duration(0), doc="Lifetime of responses without max-age, s-maxage or Expires (0s: not stored).",
    )
    default_ttl_statuses: tuple[int, ...] = setting(
        (200, 301, 404), parse=_statuses, doc="Statuses that get default_ttl.",
    )
    max_object_size: Size = setting(Size("1MiB"), doc="Larger responses stream through uncached.")
    memory_size: Size = setting(
        Size("64MiB"), doc="Bytes of the memory store of each worker, shared by every route (set it in [plugins.cache]).",
    )
    keep: Duration = setting(
        Duration("5m"), doc="How long an expired entry with an ETag or Last-Modified is kept for revalidation (304).",
    )
    stale_while_revalidate: Duration = setting(
        Duration(0), doc="Serve stale this long while refreshing in the background, when the upstream says nothing.",
    )
    stale_if_error: Duration = setting(
        Duration(0), doc="Serve stale this long when the upstream fails, when the upstream says nothing.",
    )
    collapse_timeout: Duration = setting(
        Duration("5s"), doc="Concurrent misses for one key wait this long for the first one's answer (0s: no collapsing).",
    )
    sort_query: bool = setting(False, doc="Sort the query's parameters in the key (?b=1&a=2 and ?a=2&b=1 share it).")
    key_extra: tuple[str, ...] = setting(
        (), parse=_key_extra, doc="More key parts: consumer, version, header:NAME, cookie:NAME.",
    )
    authorization: Literal["rfc", "shared", "bypass"] = setting(
        "rfc", doc="Requests with Authorization: rfc (only public, s-maxage or must-revalidate responses), shared "
                   "(like any other), bypass (never cached).",
    )
    allow_set_cookie: bool = setting(
        False, doc="Store responses with Set-Cookie (without it: a cookie only reaches the client it was set for).",
    )
    honor_request_cache_control: bool = setting(
        True, doc="Honour the client's Cache-Control (no-cache, no-store, max-age, min-fresh, max-stale, "
                  "only-if-cached) and Pragma: no-cache.",
    )
    bypass_headers: tuple[str, ...] = setting(
        DEFAULT_BYPASS_HEADERS, parse=_header_names,
        doc="Requests with any of these headers (which upstreams may act on, unkeyed) are never cached.",
    )
    tag_header: str | None = setting(
        None, doc="Upstream response header listing tags for purges (e.g. Surrogate-Key); removed from responses.",
    )
    status_header: str = setting("X-Cache", doc='Response header with HIT, MISS, STALE, BYPASS or EXPIRED ("": none).')

    def __post_init__(self) -> None:
        parts = []
        for item in self.key_extra:
            kind, _, name = item.partition(":")
            parts.append((item.lower() if name else item, kind, name.strip()))
        object.__setattr__(self, "key_parts", tuple(parts))
        # Keys that tell callers apart, so that RFC 9111 section 3.5 need not apply (serving.lookup):
        object.__setattr__(self, "keyed_by_authorization", any(
            kind == "header" and name.lower() == "authorization" for _, kind, name in parts))
        object.__setattr__(self, "keyed_by_consumer", "consumer" in self.key_extra)

    def validate(self):
        if not set(self.default_ttl_statuses) <= set(self.statuses):
            yield "default_ttl_statuses", "must be among statuses"
        if self.max_object_size <= 0:
            yield "max_object_size", "must be more than 0 bytes"
        if self.store == "shared" and self.max_object_size > SHARED_OBJECT_LIMIT:
            yield "max_object_size", "must be at most 8MiB with the shared store"
        if self.store == "memory" and self.max_object_size > self.memory_size:
            yield "max_object_size", "must not exceed memory_size"

    def validate_with(self, gateway_settings):
        """memory_size belongs to the worker, not to a route: only [plugins.cache] may set it."""
        raw = gateway_settings.plugins.get(NAME, {}).get("memory_size", CacheSettings.memory_size)
        try:
            worker_size = Size(raw)
        except (ValueError, TypeError):
            return
        if self.memory_size != worker_size:
            yield "memory_size", "is the size of each worker's memory store: set it in [plugins.cache] only"


@dataclass
class Metrics:
    requests: Any
    memory_bytes: Any
    memory_entries: Any
    evictions: Any
    stored_bytes: Any
    store_errors: Any
    collapsed: Any
    waiting: Any
    refresh_errors: Any
    purges: Any


def _metrics(registry: Any) -> Metrics:
    return Metrics(
        requests=registry.counter("plugway_cache_requests_total", "Requests on cached routes, by result.",
                                  ("route", "result"), per_request=True),
        memory_bytes=registry.gauge("plugway_cache_memory_bytes", "Bytes held by the memory stores."),
        memory_entries=registry.gauge("plugway_cache_memory_entries", "Records held by the memory stores."),
        evictions=registry.counter("plugway_cache_evictions_total", "Entries evicted from memory stores for room."),
        stored_bytes=registry.counter("plugway_cache_stored_bytes_total", "Body bytes written to a store.",
                                      ("store",)),
        store_errors=registry.counter("plugway_cache_store_errors_total",
                                      "Shared store operations that failed (served as a miss or bypass).",
                                      ("operation",)),
        collapsed=registry.counter("plugway_cache_collapsed_total",
                                   "Requests that waited for another request's fetch instead of going upstream."),
        waiting=registry.gauge("plugway_cache_waiting", "Requests waiting for another request's fetch now."),
        refresh_errors=registry.counter("plugway_cache_refresh_errors_total",
                                        "Background revalidations (stale-while-revalidate) that failed."),
        purges=registry.counter("plugway_cache_purges_total", "Purges through the admin API.", ("kind",)),
    )


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=CacheSettings, priority=PRIORITY)


@hookimpl
def worker_started(gateway):
    every = list(gateway.plugin_settings(NAME).values())
    memory_size = every[0].memory_size if every else CacheSettings.memory_size
    memory = MemoryStore(memory_size) if any(settings.store == "memory" for settings in every) else None
    state = gateway.state[NAME] = CacheState(memory=memory, shared=SharedStore(gateway.store),
                                             metrics=_metrics(gateway.metrics))
    if memory is not None:
        follower = PurgeFollower(gateway.store, memory, state.worker_id, on_purged=state.memory_changed)
        state.tasks.append(asyncio.get_running_loop().create_task(follower.run()))


@hookimpl
async def worker_stopping(gateway):
    state = gateway.state.get(NAME)
    if state is None:
        return
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)


@hookimpl
async def on_request(ctx, settings):
    return await serving.lookup(ctx, settings, ctx.gateway.state[NAME])


@hookimpl
def before_upstream(ctx, outgoing):
    serving.prepare_upstream(ctx, outgoing)


@hookimpl
async def on_error(ctx):
    return await serving.stale_on_error(ctx, ctx.gateway.state[NAME])


@hookimpl
async def on_response(ctx, response):
    return await serving.keep_response(ctx, response, ctx.gateway.state[NAME])


@hookimpl
async def after_response(ctx):
    await serving.finish(ctx, ctx.gateway.state[NAME])


@hookimpl
def admin_routes(gateway):
    return [("POST", admin.PURGE_PATH, admin.purge_endpoint(gateway, NAME))]


@hookimpl
def cli_commands(commands):
    admin.add_commands(commands)

