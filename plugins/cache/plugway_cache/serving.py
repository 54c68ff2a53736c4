"""One request through the cache: look it up, answer from the cache or go upstream (collapsed
with concurrent misses), and keep what the upstream answers.

The hooks in ``__init__`` call, in order: ``lookup`` (on_request), ``prepare_upstream``
(before_upstream), ``stale_on_error`` (on_error), ``keep_response`` (on_response) and
``finish`` (after_response). Per-request state is a ``CacheRequest`` in ``ctx.state["cache"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from gateway import GatewayError, Response, UpstreamResponse
from gateway.store import StoreUnavailable

from . import revalidation
from .collapsing import Flights, Outcome, wait_for_other_host
from .directives import HIT, REVALIDATE, STALE_REVALIDATE, Verdict, parse_cache_control, storability
from .entries import PASS, Entry, PassMarker, ResponseFacts, VaryMarker, merged_headers, new_entry
from .keys import base_key, host_port, new_nonce, sorted_query, variant_key
from .stores import MemoryStore, SharedStore
from .validators import CONDITIONAL_FIELDS, NOT_MODIFIED_FIELDS, has_conditions, not_modified

log = logging.getLogger("plugway.cache")
NAME = "cache"
UNSAFE_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))
ERROR_STATUSES = frozenset((500, 502, 503, 504))  # what stale-if-error covers (RFC 5861 section 4)
MAX_ROUNDS = 4
HIT_FOR_MISS_TTL = 30.0


class NotCached(GatewayError):
    status, code, message = 504, "not_cached", "only-if-cached was asked and no stored response can answer"


@dataclass
class CacheState:
    """One worker's cache: its memory store, the shared store adapter, flights and metrics."""

    memory: MemoryStore | None
    shared: SharedStore
    metrics: Any
    flights: Flights = dataclasses.field(default_factory=Flights)
    refreshing: set[str] = dataclasses.field(default_factory=set)
    tasks: list = dataclasses.field(default_factory=list)
    worker_id: str = dataclasses.field(default_factory=lambda: os.urandom(8).hex())
    _evictions_seen: int = 0
    _bytes_seen: int = -1

    def count(self, route: str, label: str) -> None:
        self.metrics.requests.labels(route, label.lower()).inc()

    def store_for(self, settings: Any) -> MemoryStore | SharedStore:
        return self.memory if settings.store == "memory" and self.memory is not None else self.shared

    def memory_changed(self) -> None:
        memory = self.memory
        if memory is None or memory.bytes == self._bytes_seen and memory.evictions == self._evictions_seen:
            return
        self._bytes_seen = memory.bytes
        self.metrics.memory_bytes.set(memory.bytes)
        self.metrics.memory_entries.set(len(memory))
        if memory.evictions > self._evictions_seen:
            self.metrics.evictions.inc(memory.evictions - self._evictions_seen)
            self._evictions_seen = memory.evictions

    def store_failed(self, operation: str, exc: Exception) -> None:
        self.metrics.store_errors.labels(operation).inc()
        log.debug("cache store %s failed: %s", operation, exc)


class CacheRequest:
    __slots__ = (
        "settings", "store", "base", "key", "marker", "entry", "label", "request_cc", "request_time", "storable",
        "revalidate", "authorized", "leading", "locked", "answered", "streaming", "invalidate", "passed",
    )

    def __init__(self, settings: Any, store: Any, base: str) -> None:
        self.settings = settings
        self.store = store
        self.base = base
        self.key = base  # where the entry is or would be: the base key or a variant's
        self.marker: VaryMarker | None = None
        self.entry: Entry | None = None  # a stored entry to revalidate, or to serve on error
        self.label: str | None = None  # HIT MISS STALE BYPASS EXPIRED
        self.request_cc = None
        self.request_time = time.time()
        self.storable = True
        self.revalidate = False
        self.authorized = False  # has Authorization and RFC 9111 section 3.5 applies
        self.leading: str | None = None  # the key this request fetches for its followers
        self.locked = False  # it holds that key's lock in the shared store
        self.answered = False  # answered from the cache
        self.streaming: str | None = None  # the body is being captured: pending, running, done
        self.invalidate = False  # an unsafe method: invalidate the target on success
        self.passed = False  # the lookup found a hit-for-miss record

    def bypass(self) -> None:
        self.label = "BYPASS"
        self.storable = False


# --- the request phase ----------------------------------------------------------------------------


def request_key(ctx: Any, settings: Any) -> str:
    headers = ctx.request.headers
    parts = [(label, _part(ctx, kind, argument)) for label, kind, argument in settings.key_parts]
    if ctx.peer_trusted and "X-Forwarded-Host" in headers:
        parts.append(("fh", headers["X-Forwarded-Host"]))  # a trusted proxy's, which reaches the upstream
    query = sorted_query(ctx.query) if settings.sort_query else ctx.query
    return base_key("GET", ctx.scheme, ctx.host, host_port(headers.get("Host")), ctx.path, query, parts)


def _part(ctx: Any, kind: str, argument: str) -> str | None:
    if kind == "consumer":
        return ctx.consumer.id if ctx.consumer is not None else None
    if kind == "version":
        return ctx.version
    if kind == "header":
        values = ctx.request.headers.getall(argument, ())
        return ", ".join(values) if values else None
    return ctx.request.cookies.get(argument)


def _per_caller(ctx: Any, settings: Any) -> bool:
    """Whether this request's key is its caller's own: by its Authorization header, or by the
    consumer an auth plugin established (without one, every caller has "consumer=-")."""
    consumer = ctx.consumer
    return settings.keyed_by_authorization or (
        settings.keyed_by_consumer and consumer is not None and not consumer.anonymous)


def _bypass_reason(ctx: Any, settings: Any) -> str | None:
    headers = ctx.request.headers
    if settings.authorization == "bypass" and "Authorization" in headers:
        return "authorization"
    for name in settings.bypass_headers:
        if name in headers:
            return name
    if "If-Match" in headers or "If-Unmodified-Since" in headers:
        return "precondition"
    return None


def _request_directives(headers: Any):
    if "Cache-Control" in headers:
        return parse_cache_control(headers.getall("Cache-Control"))
    if "no-cache" in headers.get("Pragma", "").lower():
        return parse_cache_control(["no-cache"])  # RFC 9111 section 5.4
    return None


async def lookup(ctx: Any, settings: Any, state: CacheState) -> Response | None:
    store = state.store_for(settings)
    req = CacheRequest(settings, store, request_key(ctx, settings))
    ctx.state[NAME] = req
    if ctx.method not in settings.methods:
        req.bypass()
        req.invalidate = ctx.method in UNSAFE_METHODS
        return None
    if _bypass_reason(ctx, settings) is not None:
        req.bypass()
        return None
    headers = ctx.request.headers
    if settings.honor_request_cache_control:
        req.request_cc = _request_directives(headers)
        req.storable = req.request_cc is None or "no-store" not in req.request_cc
    req.authorized = settings.authorization == "rfc" and "Authorization" in headers and not _per_caller(ctx, settings)
    try:
        return await _find_or_lead(ctx, req, state)
    except StoreUnavailable as exc:
        state.store_failed("get", exc)
        await land(req, state)
        req.bypass()
        return None


async def _find_or_lead(ctx: Any, req: CacheRequest, state: CacheState) -> Response | None:
    store, settings, headers = req.store, req.settings, ctx.request.headers
    for _ in range(MAX_ROUNDS):
        record = await store.get(req.base)
        req.key, req.marker = req.base, None
        if isinstance(record, VaryMarker):
            req.marker = record
            req.key = variant_key(req.base, record.nonce, record.names, headers)
            record = await store.get(req.key)
        now = time.time()
        if isinstance(record, Entry) and (record.shareable or not req.authorized):
            decision = record.decide(now, req.request_cc)
            if decision != REVALIDATE:
                await land(req, state)
                if decision == STALE_REVALIDATE:
                    start_refresh(ctx, req, record, state)
                return answer(ctx, req, record, now, "HIT" if decision == HIT else "STALE")
            req.entry = record
        if req.request_cc is not None and "only-if-cached" in req.request_cc:
            await land(req, state)
            raise NotCached()
        if "Range" in headers and req.entry is None:
            await land(req, state)  # a range of something not stored: the upstream answers it, uncached
            req.bypass()
            return None
        req.passed = isinstance(record, PassMarker)
        if req.leading or not req.storable or req.passed or settings.collapse_timeout <= 0:
            break
        outcome = await collapse(req, state)
        if outcome is Outcome.TIMEOUT or outcome is Outcome.LEAD and not store.shared:
            break
        # WAITED: the answer should be stored now; LEAD with the shared store: look once more,
        # since another host may have stored it between this request's miss and its lock.
    req.label = "EXPIRED" if req.entry is not None else "MISS"
    req.revalidate = req.entry is not None and req.entry.has_validator
    return None


async def collapse(req: CacheRequest, state: CacheState) -> Outcome:
    key, flights, timeout, metrics = req.key, state.flights, req.settings.collapse_timeout, state.metrics
    if key in flights:
        metrics.collapsed.inc()
        metrics.waiting.inc()
        try:
            return Outcome.WAITED if await flights.follow(key, timeout) else Outcome.TIMEOUT
        finally:
            metrics.waiting.dec()
    flights.take_off(key)
    req.leading = key
    if not req.store.shared or await req.store.lock(key, timeout):
        req.locked = req.store.shared
        return Outcome.LEAD
    metrics.collapsed.inc()
    metrics.waiting.inc()
    try:
        landed = await wait_for_other_host(req.store, key, timeout)
    finally:
        metrics.waiting.dec()
        await land(req, state)
    return Outcome.WAITED if landed else Outcome.TIMEOUT


async def land(req: CacheRequest, state: CacheState) -> None:
    """This request's fetch is over (stored or not): wake its followers and release its lock."""
    key = req.leading
    if key is None:
        return
    req.leading = None
    state.flights.land(key)
    if req.locked:
        req.locked = False
        try:
            await req.store.unlock(key)
        except StoreUnavailable as exc:
            state.store_failed("unlock", exc)  # the lock expires on its own


def answer(ctx: Any, req: CacheRequest, entry: Entry, now: float, label: str) -> Response:
    """The response to send from ``entry``: 304 if the client's own copy is current."""
    req.label = label
    req.answered = True
    settings = req.settings
    headers = list(entry.headers)
    headers.append(("Age", str(int(entry.age(now)))))
    if settings.status_header:
        headers.append((settings.status_header, label))
    if entry.status == 200 and has_conditions(ctx.request.headers) and \
            not_modified(ctx.request.headers, entry.etag, entry.last_modified):
        kept = [(name, value) for name, value in headers if name.lower() in NOT_MODIFIED_FIELDS]
        return Response(304, b"", kept + headers[len(entry.headers):])
    return Response(entry.status, entry.body, headers)


def prepare_upstream(ctx: Any, outgoing: Any) -> None:
    """A request whose answer may be stored asks for the whole body (the cache answers the
    client's conditions and ranges itself), with the stored entry's validators, as GET."""
    req = ctx.state.get(NAME)
    if req is None or not req.storable:
        return
    if req.revalidate or any(name in ctx.request.headers for name in CONDITIONAL_FIELDS):
        _set_conditions(req, outgoing.headers)  # (outgoing.headers is a copy made on first use: only if needed)
    if outgoing.method == "HEAD":
        outgoing.method = "GET"  # the GET entry answers HEAD requests (nginx's proxy_cache_convert_head)
    req.request_time = time.time()


def _set_conditions(req: CacheRequest, headers: Any) -> None:
    for name in CONDITIONAL_FIELDS:
        headers.popall(name, None)
    if req.revalidate:
        if req.entry.etag is not None:
            headers["If-None-Match"] = req.entry.etag
        if req.entry.last_modified is not None:
            headers["If-Modified-Since"] = req.entry.last_modified


async def stale_on_error(ctx: Any, state: CacheState) -> Response | None:
    """stale-if-error when the upstream could not be reached or did not answer in time."""
    req = ctx.state.get(NAME)
    now = time.time()
    if req is None or req.entry is None or not req.entry.usable_on_error(now):
        return None
    await land(req, state)
    return answer(ctx, req, req.entry, now, "STALE")


# --- the response phase ---------------------------------------------------------------------------


async def keep_response(ctx: Any, response: Any, state: CacheState) -> Response | None:
    req = ctx.state.get(NAME)
    if req is None or req.answered:
        return None
    try:
        return await _keep(ctx, req, response, state)
    except StoreUnavailable as exc:
        state.store_failed("set", exc)
        await land(req, state)
        return None


async def _keep(ctx: Any, req: CacheRequest, response: Any, state: CacheState) -> Response | None:
    settings, now, status = req.settings, time.time(), response.status
    if req.label == "BYPASS":
        if req.invalidate and 200 <= status < 400:
            await req.store.delete(req.base)  # RFC 9111 section 4.4: an unsafe request changed the target
            state.memory_changed()
        _label(response, req)
        return None
    if not isinstance(response, UpstreamResponse):  # an error made by the gateway, or a plugin's answer
        await land(req, state)
        if status in ERROR_STATUSES and req.entry is not None and req.entry.usable_on_error(now):
            return answer(ctx, req, req.entry, now, "STALE")
        _label(response, req)
        return None
    request_headers = ctx.request.headers
    if status == 304 and req.revalidate:
        entry = await keep_refreshed(req, state, response.headers, request_headers, now)
        await land(req, state)
        return answer(ctx, req, entry, now, "EXPIRED")
    if status in ERROR_STATUSES and req.entry is not None and req.entry.usable_on_error(now):
        await land(req, state)
        return answer(ctx, req, req.entry, now, "STALE")
    facts, verdict = assess(req, status, response.headers, now)
    if verdict.store:
        facts.read_all()
    _label(response, req)
    length = response.content_length
    if verdict.store and length is not None and length > settings.max_object_size:
        verdict = Verdict(False, "larger than max_object_size", True)
    if not verdict.store:
        if verdict.intrinsic and not req.passed:
            await keep_pass(req, state, facts, request_headers)
        await land(req, state)
        return None
    headers = CIMultiDict(response.headers)  # as the upstream sent it: outer plugins change the original
    if length is None and ctx.method != "HEAD":
        req.streaming = "pending"
        response.wrap_body(_capture(ctx, req, state, status, headers, facts, now))
        return None
    try:
        body = await response.read(settings.max_object_size)
    except GatewayError:
        await land(req, state)
        if ctx.method == "HEAD":
            return None  # too large to keep; a HEAD client needs no body
        raise
    entry = await keep(req, state, new_entry(status, headers, body, facts, now, _dropped(settings)), facts,
                       request_headers, now)
    await land(req, state)
    if entry.status == 200 and has_conditions(request_headers) and \
            not_modified(request_headers, entry.etag, entry.last_modified):
        return answer(ctx, req, entry, now, req.label)
    return None


def assess(req: CacheRequest, status: int, headers: Any, now: float) -> tuple[ResponseFacts, Verdict]:
    settings = req.settings
    facts = ResponseFacts(status, headers, req.request_time, now, settings)
    verdict = storability(
        status, facts.cc, facts.lifetime, has_validator=facts.etag is not None or facts.last_modified is not None,
        has_set_cookie=facts.set_cookie, vary_star=facts.vary is None, authorized=req.authorized,
        request_no_store=not req.storable, settings=settings,
    )
    return facts, verdict


def _label(response: Any, req: CacheRequest) -> None:
    settings = req.settings
    headers = response.headers
    if settings.status_header and req.label:
        headers[settings.status_header] = req.label
    if settings.tag_header:
        headers.popall(settings.tag_header, None)  # tags are for purges, not for clients


def _dropped(settings: Any) -> tuple[str, ...]:
    return (settings.tag_header, settings.status_header)


def _entry_key(req: CacheRequest, facts: ResponseFacts, request_headers: Any) -> tuple[str, VaryMarker | None]:
    """Where a response goes: the base key, or (with Vary) a variant key under a Vary record."""
    if not facts.vary:
        return req.base, None
    marker = req.marker
    if marker is None or marker.names != facts.vary:
        marker = VaryMarker(facts.vary, new_nonce())
    return variant_key(req.base, marker.nonce, marker.names, request_headers), marker


async def keep(req: CacheRequest, state: CacheState, entry: Entry, facts: ResponseFacts, request_headers: Any,
               now: float) -> Entry:
    key, marker = _entry_key(req, facts, request_headers)
    ttl = entry.store_ttl(now, req.settings.keep)
    if marker is not None:
        await req.store.put(req.base, marker, ttl)
    await req.store.put(key, entry, ttl)
    state.metrics.stored_bytes.labels(req.settings.store).inc(len(entry.body))
    state.memory_changed()
    return entry


async def keep_pass(req: CacheRequest, state: CacheState, facts: ResponseFacts, request_headers: Any) -> None:
    """Remember that this key's response cannot be stored, so requests stop waiting for each other."""
    if facts.vary is None:
        key, marker = req.base, None
    else:
        key, marker = _entry_key(req, facts, request_headers)
    if marker is not None:
        await req.store.put(req.base, marker, HIT_FOR_MISS_TTL)
    await req.store.put(key, PASS, HIT_FOR_MISS_TTL)
    state.memory_changed()


async def keep_refreshed(req: CacheRequest, state: CacheState, update: Any, request_headers: Any, now: float) -> Entry:
    """The stored entry updated by a 304 (RFC 9111 section 4.3.4), stored again if it may be."""
    old = req.entry
    headers = CIMultiDict(merged_headers(old.headers, update))
    facts, verdict = assess(req, old.status, headers, now)
    entry = new_entry(old.status, headers, old.body, facts, now, _dropped(req.settings))
    entry.tags = entry.tags or old.tags  # the stored headers have no tag header: keep the old tags
    if verdict.store:
        await keep(req, state, entry, facts, request_headers, now)
    else:
        await req.store.delete(req.key)
        state.memory_changed()
    return entry


def _capture(ctx: Any, req: CacheRequest, state: CacheState, status: int, headers: CIMultiDict, facts: ResponseFacts,
             response_time: float):
    """A body wrapper that passes every chunk on at once and keeps a copy up to max_object_size;
    past it, the copy is dropped and the response is not stored."""
    limit = req.settings.max_object_size
    request_headers = ctx.request.headers

    async def store_copy(body: bytes | None) -> None:
        try:
            if body is not None:
                entry = new_entry(status, headers, body, facts, response_time, _dropped(req.settings))
                await keep(req, state, entry, facts, request_headers, time.time())
            else:
                await keep_pass(req, state, facts, request_headers)
        except StoreUnavailable as exc:
            state.store_failed("set", exc)
        except Exception:
            log.exception("storing a streamed response failed")
        finally:
            await land(req, state)

    async def capture(stream):
        req.streaming = "running"
        chunks: list[bytes] | None = []
        size, complete = 0, False
        try:
            async for chunk in stream:
                if chunks is not None:
                    size += len(chunk)
                    if size > limit:
                        chunks = None
                    else:
                        chunks.append(chunk)
                yield chunk
            complete = True
        finally:
            req.streaming = "done"
            if complete:
                ctx.gateway.spawn(store_copy(b"".join(chunks) if chunks is not None else None))
            else:
                ctx.gateway.spawn(land(req, state))  # the upstream or the client went away: nothing to keep

    return capture


async def finish(ctx: Any, state: CacheState) -> None:
    """The log phase: count the result; a leader whose answer never came lets its followers go."""
    req = ctx.state.get(NAME)
    if req is None:
        return
    if req.leading is not None and req.streaming in (None, "pending"):
        await land(req, state)
    if req.label is not None:
        ctx.log[NAME] = req.label
        state.count(ctx.route.name, req.label)


# --- stale-while-revalidate -----------------------------------------------------------------------


def start_refresh(ctx: Any, req: CacheRequest, entry: Entry, state: CacheState) -> None:
    if req.key in state.refreshing:
        return
    state.refreshing.add(req.key)
    refresh = CacheRequest(req.settings, req.store, req.base)
    refresh.key, refresh.marker, refresh.entry, refresh.authorized = req.key, req.marker, entry, req.authorized
    ctx.gateway.spawn(_refresh(ctx, refresh, state))


async def _refresh(ctx: Any, req: CacheRequest, state: CacheState) -> None:
    settings, key = req.settings, req.key
    try:
        if req.store.shared:
            if not await req.store.lock(key, max(settings.collapse_timeout, 1.0)):
                return  # another worker or host refreshes it
            req.leading, req.locked = key, True
        req.request_time = time.time()
        fetched = await revalidation.fetch(ctx, req.entry, settings.max_object_size, NAME)
        now = time.time()
        if fetched is None or fetched.status in ERROR_STATUSES:
            return  # the stale entry stays, for its stale windows
        request_headers = ctx.request.headers
        if fetched.status == 304:
            await keep_refreshed(req, state, fetched.headers, request_headers, now)
            return
        facts, verdict = assess(req, fetched.status, fetched.headers, now)
        if verdict.store and fetched.body is not None:
            entry = new_entry(fetched.status, fetched.headers, fetched.body, facts, now, _dropped(settings))
            await keep(req, state, entry, facts, request_headers, now)
        elif verdict.intrinsic or fetched.body is None:
            await keep_pass(req, state, facts, request_headers)
    except (GatewayError, StoreUnavailable, OSError) as exc:
        state.metrics.refresh_errors.inc()
        log.debug("background revalidation of %s failed: %s", key, exc)
    except Exception:
        state.metrics.refresh_errors.inc()
        log.exception("background revalidation of %s failed", key)
    finally:
        state.refreshing.discard(key)
        await land(req, state)
