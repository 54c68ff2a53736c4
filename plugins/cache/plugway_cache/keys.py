"""Cache keys: which requests share a stored response. Pure.

A key is readable text, path first so that a purge by path prefix is a prefix of keys::

    <path>[?<query>] <scheme>://<host>[:<port>] <METHOD>[ <part>=<value>]...

- ``path`` is the gateway's canonical path (``ctx.path``): ``/a/%61/../b`` and ``/a//b``
  are the same key, and encodings the core refuses never reach a key.
- ``query`` is the raw query, its ``&``-separated parameters sorted when the route says so.
- ``host`` is the Host header lower-cased without a trailing dot (``ctx.host``); a port the
  client wrote is kept, because the upstream sees it (in ``X-Forwarded-Host``) and may
  reflect it into the body.
- ``METHOD`` is ``GET`` for HEAD requests too: HEAD is answered from the GET entry.
- each configured part (``consumer``, ``version``, ``header:NAME``, ``cookie:NAME``) adds
  ``name=value``; ``fh=`` is the ``X-Forwarded-Host`` of a trusted proxy, which reaches the
  upstream. A value with a space or a control character, or longer than 64 characters, is
  replaced by ``h:`` and 32 hex digits of its SHA-256.

In the store, entries live under ``cache:<key>``. A response with ``Vary`` is stored under
``cache:<key> vary=<32 hex digits>`` (a hash of the varying request headers' values), and
``cache:<key>`` then holds a small record naming those headers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping

ENTRY_PREFIX = "cache:"
LOCK_PREFIX = "cache-lock:"
TAG_PREFIX = "cache-tag:"
_HASH_OVER = 64


def base_key(
    method: str, scheme: str, host: str, port: str, path: str, query: str, parts: Iterable[tuple[str, str]] = (),
) -> str:
    """The store key of a request, before Vary (``port`` is ``""`` or ``":8080"``)."""
    target = f"{path}?{query}" if query else path
    key = f"{ENTRY_PREFIX}{target.replace(' ', '%20')} {scheme}://{host}{port} {method}"
    for name, value in parts:
        key += f" {name}={part_value(value)}"
    return key


def sorted_query(query: str) -> str:
    return "&".join(sorted(query.split("&"))) if "&" in query else query


def host_port(host_header: str | None) -> str:
    """``":8080"`` when the Host header names a port, else ``""``."""
    if not host_header:
        return ""
    closing = host_header.rfind("]")
    colon = host_header.rfind(":")
    if colon > closing and host_header[colon + 1:].isdigit():
        return host_header[colon:]
    return ""


def part_value(value: str | None) -> str:
    if value is None:
        return "-"
    if len(value) > _HASH_OVER or not value.isprintable() or " " in value:
        return "h:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return value


def vary_names(values: Iterable[str]) -> tuple[str, ...] | None:
    """The request headers a response varies on (sorted, lower case); None for ``Vary: *``."""
    names = set()
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def variant_key(base: str, nonce: str, names: Iterable[str], headers: Mapping[str, str]) -> str:
    """The key of one variant: the values of the Vary'd request headers (all lines, in order)."""
    digest = hashlib.sha256(nonce.encode())
    getall = getattr(headers, "getall", None)
    for name in names:
        values = getall(name, ()) if getall is not None else ([headers[name]] if name in headers else ())
        digest.update(b"\x00" + name.encode("latin-1", "replace") + b"\x01")
        if values:
            digest.update(", ".join(value.strip() for value in values).encode("latin-1", "replace"))
        else:
            digest.update(b"\x02")  # absent differs from empty
    return f"{base} vary={digest.hexdigest()[:32]}"


def new_nonce() -> str:
    """Variant keys of a base key include its Vary record's nonce: deleting the record (an
    invalidation) makes every old variant unreachable, even once a new record is written."""
    return os.urandom(8).hex()


def lock_key(key: str) -> str:
    return LOCK_PREFIX + key.removeprefix(ENTRY_PREFIX)


def tag_key(tag: str) -> str:
    """The store set listing the keys of a tag's entries (shared store)."""
    return TAG_PREFIX + tag


def parse_tags(values: Iterable[str], limit: int = 32) -> tuple[str, ...]:
    """Tags from a header such as Surrogate-Key (space-separated) or Cache-Tag (commas)."""
    tags: list[str] = []
    for value in values:
        for tag in value.replace(",", " ").split():
            if tag.isprintable() and len(tag) <= 128 and tag not in tags:
                tags.append(tag)
    return tuple(tags[:limit])
