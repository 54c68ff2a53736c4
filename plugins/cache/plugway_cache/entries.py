"""What the cache stores: entries (a response and its freshness), and two small records.

- ``Entry``: status, headers, body and what RFC 9111 needs to serve it later.
- ``VaryMarker``: at a base key whose response varies; names the request headers.
- ``PassMarker``: "the last response here could not be stored" (Varnish's hit-for-miss),
  so that requests stop waiting for each other on that key; a storable response replaces it.

``encode``/``decode`` turn them into bytes for the shared store: a 4-byte magic, a kind
byte, then for an entry a 4-byte length, that many bytes of JSON (everything but the body),
and the body. Pure; no gateway imports.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .directives import (
    CacheControl, StaleRules, evaluate, explicit_lifetime, http_date, initial_age, parse_cache_control, stale_rules,
    unstored_fields,
)
from .keys import parse_tags, vary_names

MAGIC = b"PWC1"
_LENGTH = struct.Struct(">I")
# Memory taken by an entry besides its body and header text, measured with tracemalloc
# (tests/test_cache_stores.py checks the estimate against it): the Entry object, its headers
# list and tuples and their str objects, the body's bytes object, the LRU's key and slot.
ENTRY_OVERHEAD = 700
HEADER_OVERHEAD = 260


@dataclass(slots=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]  # end-to-end headers as stored (no Age, Set-Cookie, tag header)
    body: bytes
    response_time: float  # when the response (or the 304 that last refreshed it) arrived
    initial_age: float  # its corrected initial age then (RFC 9111 section 4.2.3)
    lifetime: float  # freshness lifetime in seconds
    stale: StaleRules
    no_cache: bool  # must be revalidated before every use
    shareable: bool  # may answer requests with Authorization (public, s-maxage, must-revalidate)
    etag: str | None
    last_modified: str | None
    tags: tuple[str, ...] = ()

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.response_time)

    def decide(self, now: float, request: CacheControl | None) -> str:
        return evaluate(self.age(now), self.lifetime, no_cache=self.no_cache, rules=self.stale, request=request)

    def usable_on_error(self, now: float) -> bool:
        """Whether stale-if-error lets this entry answer when the upstream fails."""
        if self.stale.must_revalidate or self.no_cache:
            return False
        return self.age(now) - self.lifetime < self.stale.if_error

    @property
    def has_validator(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def store_ttl(self, now: float, keep: float) -> float:
        """How long to keep it: its remaining freshness, its stale windows, and ``keep`` more
        when it has a validator (an expired entry can still be revalidated with a 304)."""
        ttl = max(0.0, self.lifetime - self.age(now)) + max(self.stale.while_revalidate, self.stale.if_error)
        return ttl + keep if self.has_validator else ttl

    @property
    def size(self) -> int:
        headers = sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in self.headers)
        return len(self.body) + headers + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class VaryMarker:
    names: tuple[str, ...]
    nonce: str

    @property
    def size(self) -> int:
        return ENTRY_OVERHEAD + sum(len(name) + 60 for name in self.names)


class PassMarker:
    __slots__ = ()
    size = ENTRY_OVERHEAD


PASS = PassMarker()
Record = Entry | VaryMarker | PassMarker


# --- from a response -------------------------------------------------------------------------------


class ResponseFacts:
    """What the cache reads from a response's headers. What only a stored response needs (its
    age, stale windows and tags) is read on first use: most responses are not stored."""

    def __init__(self, status: int, headers: Any, request_time: float, response_time: float, settings: Any) -> None:
        """``headers`` is a multidict (``getall``); ``settings`` gives ``default_ttl``,
        ``default_ttl_statuses``, ``stale_while_revalidate``, ``stale_if_error``, ``tag_header``."""
        self.headers, self.settings = headers, settings
        self.request_time, self.response_time = request_time, response_time
        self.cc = cc = parse_cache_control(headers.getall("Cache-Control", ()))
        expires = headers.getall("Expires", ())
        self.date = http_date(headers.get("Date")) if expires else None
        lifetime = explicit_lifetime(cc, expires, self.date, response_time)
        if lifetime is None and settings.default_ttl > 0 and status in settings.default_ttl_statuses:
            lifetime = float(settings.default_ttl)
        self.lifetime = lifetime  # None: no freshness information and no default
        self.etag: str | None = headers.get("ETag")
        self.last_modified: str | None = headers.get("Last-Modified")
        self.vary = vary_names(headers.getall("Vary", ())) if "Vary" in headers else ()  # None for Vary: *
        self.set_cookie = "Set-Cookie" in headers

    @functools.cached_property
    def initial_age(self) -> float:
        date = self.date if self.date is not None else http_date(self.headers.get("Date"))
        return initial_age(self.headers.get("Age"), date, self.request_time, self.response_time)

    @functools.cached_property
    def stale(self) -> StaleRules:
        return stale_rules(self.cc, self.settings.stale_while_revalidate, self.settings.stale_if_error)

    @functools.cached_property
    def tags(self) -> tuple[str, ...]:
        tag_header = self.settings.tag_header
        return parse_tags(self.headers.getall(tag_header, ())) if tag_header else ()

    def read_all(self) -> ResponseFacts:
        """Read the rest now, before other plugins change the response's headers."""
        for name in ("initial_age", "stale", "tags"):
            getattr(self, name)
        return self


def stored_headers(headers: Any, facts: ResponseFacts, dropped: Iterable[str]) -> list[tuple[str, str]]:
    """The headers to keep: not Age (recomputed), Set-Cookie, ``private="..."`` /
    ``no-cache="..."`` fields, nor ``dropped`` (the tag and cache-status headers)."""
    drop = {"age", "set-cookie", *unstored_fields(facts.cc), *(name.lower() for name in dropped if name)}
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


def new_entry(status: int, headers: Any, body: bytes, facts: ResponseFacts, response_time: float,
              dropped: Iterable[str]) -> Entry:
    cc = facts.cc
    return Entry(
        status=status, headers=stored_headers(headers, facts, dropped), body=body, response_time=response_time,
        initial_age=facts.initial_age, lifetime=facts.lifetime or 0.0, stale=facts.stale,
        no_cache=cc.unqualified("no-cache"),
        shareable="public" in cc or "s-maxage" in cc or "must-revalidate" in cc,
        etag=facts.etag, last_modified=facts.last_modified, tags=facts.tags,
    )


# Fields a 304 must not change in the stored response (RFC 9111 section 3.2), besides framing.
_KEPT_ON_UPDATE = frozenset(("content-length", "content-encoding", "content-type", "content-range", "set-cookie",
                             "age", "transfer-encoding"))


def merged_headers(stored: list[tuple[str, str]], update: Any) -> list[tuple[str, str]]:
    """The stored headers with every field the 304 carries replaced by the 304's lines."""
    replaced = {name.lower() for name in update.keys()} - _KEPT_ON_UPDATE
    kept = [(name, value) for name, value in stored if name.lower() not in replaced]
    return kept + [(name, value) for name, value in update.items() if name.lower() in replaced]


# --- bytes for the shared store --------------------------------------------------------------------


def encode(record: Record) -> bytes:
    if isinstance(record, PassMarker):
        return MAGIC + b"P"
    if isinstance(record, VaryMarker):
        return MAGIC + b"V" + json.dumps([record.nonce, *record.names]).encode()
    meta = json.dumps({
        "s": record.status, "h": record.headers, "rt": record.response_time, "ia": record.initial_age,
        "lt": record.lifetime, "swr": record.stale.while_revalidate, "sie": record.stale.if_error,
        "mr": record.stale.must_revalidate, "nc": record.no_cache, "sh": record.shareable, "et": record.etag,
        "lm": record.last_modified, "tg": record.tags,
    }, separators=(",", ":")).encode()
    return b"".join((MAGIC, b"E", _LENGTH.pack(len(meta)), meta, record.body))


def decode(data: bytes | None) -> Record | None:
    """The record, or None for nothing or anything this version cannot read (a miss)."""
    if not isinstance(data, bytes) or len(data) < 5 or not data.startswith(MAGIC):
        return None
    kind = data[4:5]
    try:
        if kind == b"P":
            return PASS
        if kind == b"V":
            nonce, *names = json.loads(data[5:])
            return VaryMarker(tuple(names), nonce)
        if kind == b"E":
            (length,) = _LENGTH.unpack_from(data, 5)
            meta = json.loads(data[9:9 + length])
            return Entry(
                status=meta["s"], headers=[(name, value) for name, value in meta["h"]], body=data[9 + length:],
                response_time=meta["rt"], initial_age=meta["ia"], lifetime=meta["lt"],
                stale=StaleRules(meta["swr"], meta["sie"], meta["mr"]), no_cache=meta["nc"], shareable=meta["sh"],
                etag=meta["et"], last_modified=meta["lm"], tags=tuple(meta["tg"]),
            )
    except (ValueError, KeyError, TypeError, struct.error):
        return None
    return None
