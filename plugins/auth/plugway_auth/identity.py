"""Who a credential identifies: the consumer, and the headers that tell the upstream.

Everything taken from a token's claims that reaches a header, a log line or a rate-limit
key is checked here: visible ASCII only (no CR, LF or other control characters), bounded
length. A claim that fails is a refused token (401), never a 500 when the header is sent.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway import Consumer

from .errors import Refused

ANONYMOUS = "anonymous"
MAX_VALUE_LENGTH = 1024


@dataclass(frozen=True)
class HeaderNames:
    """Which upstream headers carry the identity (None: not sent)."""

    consumer: str | None = "X-Consumer-ID"
    roles: str | None = "X-Consumer-Roles"
    scopes: str | None = "X-Consumer-Scopes"
    claims: tuple[tuple[str, str], ...] = ()  # (header, claim)


@dataclass(frozen=True)
class Identity:
    """An accepted credential: the consumer, its upstream headers, and what revocation needs."""

    consumer: Consumer
    headers: tuple[tuple[str, str], ...]
    jti: str | None = None
    issued_at: float | None = None
    expires: float | None = None
    revocable: bool = False


def header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable() and len(value) <= MAX_VALUE_LENGTH


def claim_value(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by dotted path into nested objects (``realm_access.roles``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def name_list(value: Any, *, spaces: bool) -> tuple[str, ...]:
    """Roles or scopes from a claim: a list of strings, or one space-separated string."""
    if value is None:
        return ()
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise Refused("invalid_claims")
    for item in items:
        if not header_safe(item) or "," in item or not spaces and " " in item:
            raise Refused("invalid_claims")
    return tuple(items)


def consumer_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256 or not header_safe(value) or value == ANONYMOUS:
        raise Refused("invalid_claims")
    return value


def build_identity(
    names: HeaderNames, consumer: str, roles: tuple[str, ...], scopes: tuple[str, ...],
    claims: Mapping[str, Any] | None = None, anonymous: bool = False, **revocation: Any,
) -> Identity:
    """The identity and its headers; a claim header whose value is not header-safe refuses the token."""
    headers = []
    if names.consumer:
        headers.append((names.consumer, consumer))
    if names.roles and roles:
        headers.append((names.roles, ",".join(roles)))
    if names.scopes and scopes:
        headers.append((names.scopes, " ".join(scopes)))
    for header, claim in names.claims:
        value = claim_value(claims or {}, claim)
        if value is None:
            continue
        if not isinstance(value, (str, int, float)):
            raise Refused("invalid_claims")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if not header_safe(text):
            raise Refused("invalid_claims")
        headers.append((header, text))
    frozen_claims = types.MappingProxyType(dict(claims or {}))
    return Identity(Consumer(consumer, roles, scopes, frozen_claims, anonymous), tuple(headers), **revocation)


def anonymous_identity(names: HeaderNames) -> Identity:
    return build_identity(names, ANONYMOUS, (ANONYMOUS,), (), anonymous=True)
