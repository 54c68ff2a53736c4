"""Conditional requests answered by the cache: If-None-Match and If-Modified-Since (RFC 9110
section 13). Pure."""

from __future__ import annotations

from collections.abc import Mapping

from .directives import http_date

# What a 304 carries from the 200 it stands for (RFC 9110 section 15.4.5), plus Last-Modified.
NOT_MODIFIED_FIELDS = frozenset(("cache-control", "content-location", "date", "etag", "expires", "vary",
                                 "last-modified"))
# Request fields the cache answers itself, or that would make the upstream answer only part of
# the body; none of them is sent upstream when the response may be stored.
CONDITIONAL_FIELDS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range", "Range")


def entity_tags(value: str) -> list[str]:
    """The entity-tags of an If-None-Match value (``*`` stays ``*``)."""
    tags, index, end = [], 0, len(value)
    while index < end:
        while index < end and value[index] in " \t,":
            index += 1
        if index >= end:
            break
        start = index
        if value.startswith("W/", index):
            index += 2
        if index < end and value[index] == '"':
            closing = value.find('"', index + 1)
            index = end if closing < 0 else closing + 1
        else:
            while index < end and value[index] not in " \t,":
                index += 1
        tags.append(value[start:index])
    return tags


def weak_match(first: str, second: str) -> bool:
    """Weak comparison: the opaque tags are equal, whether or not either is weak."""
    return first.removeprefix("W/") == second.removeprefix("W/")


def not_modified(request_headers: Mapping[str, str], etag: str | None, last_modified: str | None) -> bool:
    """Whether the client's own copy is current, so that it can be answered 304.

    If-None-Match takes precedence over If-Modified-Since (RFC 9110 section 13.2.2)."""
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        if etag is None:
            return False
        tags = entity_tags(if_none_match)
        return "*" in tags or any(weak_match(tag, etag) for tag in tags)
    if_modified_since = request_headers.get("If-Modified-Since")
    if if_modified_since is None or last_modified is None:
        return False
    since, modified = http_date(if_modified_since), http_date(last_modified)
    return since is not None and modified is not None and modified <= since


def has_conditions(request_headers: Mapping[str, str]) -> bool:
    return "If-None-Match" in request_headers or "If-Modified-Since" in request_headers
