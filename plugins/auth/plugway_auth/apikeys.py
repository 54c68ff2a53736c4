"""API keys: only their SHA-256 is configured; a presented key is hashed and looked up.

Keys are 256 random bits (``plugway apikey new``), so a fast unsalted hash is enough: no
dictionary or brute-force attack can reach a random 256-bit preimage, and the lookup costs
one SHA-256 per request. (Client secrets of the token endpoint, which people may choose,
get a salted slow hash instead; see ``passwords.py``.) The table is a dict keyed by digest;
the match is then confirmed with ``hmac.compare_digest``, so no comparison of secret bytes
ever depends on where they first differ.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import Refused
from .identity import Identity

PREFIX = "pwk_"
HASH_PREFIX = "sha256:"
MAX_KEY_LENGTH = 512


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def parse_hash(text: object) -> str:
    """A configured hash, checked: "sha256:" and 64 hex digits (lower-cased)."""
    if not isinstance(text, str) or not text.startswith(HASH_PREFIX):
        raise ValueError('must be "sha256:" followed by 64 hex digits (see `plugway apikey new`)')
    digest = text[len(HASH_PREFIX):].lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError('must be "sha256:" followed by 64 hex digits (see `plugway apikey new`)')
    return HASH_PREFIX + digest


def parse_time(raw: object) -> datetime.datetime:
    """An expiry: a TOML date-time with offset, or the same as an RFC 3339 string."""
    value = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) else raw
    if not isinstance(value, datetime.datetime) or value.tzinfo is None:
        raise ValueError(f"{raw!r} is not a date-time with a time zone, such as 2027-01-31T00:00:00Z")
    return value


@dataclass(frozen=True)
class ApiKey:
    digest: bytes
    identity: Identity
    expires: float | None


class ApiKeyTable:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest = {key.digest: key for key in keys}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def identity(self, presented: str, now: float) -> Identity:
        if len(presented) > MAX_KEY_LENGTH:
            raise Refused("invalid_api_key")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            raise Refused("invalid_api_key")
        if key.expires is not None and now >= key.expires:
            raise Refused("expired_api_key")
        return key.identity


def config_block(key_hash: str, consumer: str, roles: list[str], scopes: list[str], expires: str | None) -> str:
    """The TOML lines that configure one key."""
    lines = ["[[plugins.auth.api_keys]]", f'hash = "{key_hash}"', f"consumer = {json.dumps(consumer)}"]
    if roles:
        lines.append(f"roles = {json.dumps(roles)}")
    if scopes:
        lines.append(f"scopes = {json.dumps(scopes)}")
    if expires:
        lines.append(f"expires = {expires}")
    return "\n".join(lines)
