"""JWT verification: strict parsing, the issuer's own algorithms and keys, then the claims.

The order of checks, for one token:

1. size (``max_token_size``) before anything is decoded;
2. three base64url segments, a JSON object header and payload (duplicate member names,
   NaN and Infinity refused), no ``crit`` extension;
3. the issuer, chosen by the token's ``iss`` among the configured ones (or the one
   configured without ``issuer``);
4. ``alg`` must be one of that issuer's algorithms (``none`` never is), and the key is
   looked up among that issuer's keys of the kind the algorithm needs, by ``kid``;
5. the signature (PyJWT's algorithm implementations);
6. the claims: required ones present; ``exp``, ``nbf``, ``iat`` numbers (a string ``exp``
   is refused, unlike PyJWT's default) checked against the current time with ``leeway``;
   a lifetime (``exp`` minus ``iat``, or minus now) of at most ``max_lifetime``; ``aud`` and
   ``typ`` when the issuer configures them; the consumer, roles and scopes header-safe.

PyJWT's ``decode`` is not used for the claims because its defaults are loose (no required
``exp``, string or huge ``exp`` accepted, ``typ`` ignored); see the research notes, J4-J13.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import Refused
from .identity import HeaderNames, Identity, build_identity, claim_value, consumer_id, name_list
from .keys import KeySet, VerificationKey, verify

MAX_KEYS_TRIED = 4  # a token without a kid is checked against at most this many keys
_BASE64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class ParsedToken:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _segment(raw: bytes, *, empty: bool = False) -> bytes:
    if not raw and not empty or len(raw) % 4 == 1 or not _BASE64URL.issuperset(raw):
        raise Refused("malformed")
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise Refused("malformed") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise Refused("malformed") from None
    if not isinstance(value, dict):
        raise Refused("malformed")
    return value


def parse_token(token: str) -> ParsedToken:
    """The token's parts, decoded; ``Refused("malformed")`` for anything but a compact JWS."""
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        raise Refused("malformed") from None
    parts = raw.split(b".")
    if len(parts) != 3:
        raise Refused("malformed")
    header = _json_object(_segment(parts[0]))
    claims = _json_object(_segment(parts[1]))
    signature = _segment(parts[2], empty=True)  # an empty one fails verification (alg "none" is refused by name)
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or kid is not None and not isinstance(kid, str) or "crit" in header:
        raise Refused("malformed")  # we implement no JWS extension, so any crit must be refused
    return ParsedToken(header, claims, parts[0] + b"." + parts[1], signature)


class KeySource(Protocol):
    """Where an issuer's keys come from: fixed (configuration) or a JWKS URL."""

    current: KeySet | None

    def candidates(self, algorithm: str, kid: str | None) -> Awaitable[list[VerificationKey]]: ...

    def fresh(self) -> KeySet | None:
        """The current set, starting a background refresh when it is stale."""


class StaticKeys:
    def __init__(self, keys: KeySet) -> None:
        self.current = keys

    def fresh(self) -> KeySet:
        return self.current

    async def candidates(self, algorithm: str, kid: str | None) -> list[VerificationKey]:
        return self.current.candidates(algorithm, kid)


@dataclass(frozen=True)
class Issuer:
    """One configured issuer, compiled."""

    name: str
    issuer: str | None
    audience: frozenset[str]
    algorithms: frozenset[str]
    typ: str | None
    required_claims: tuple[str, ...]
    consumer_claim: str
    roles_claim: str | None
    scopes_claim: str | None
    keys: KeySource


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise Refused("invalid_claims")
    return value


def _typ_matches(expected: str, actual: Any) -> bool:
    if not isinstance(actual, str):
        return False
    actual = actual.lower()
    return actual == expected or actual == "application/" + expected


class TokenVerifier:
    """Verifies JWTs for one configuration of the plugin (a route's settings).

    Verified tokens are cached (``cache_size`` entries, oldest out first) keyed by the
    SHA-256 of the whole token; an entry is used only while the token has not expired and
    its issuer still has the same key set. Revocation is checked by the caller on every
    request, cached or not. ``verified`` (if given) is called for every token checked in
    full, i.e. not answered from the cache.
    """

    def __init__(
        self, issuers: list[Issuer], *, leeway: float, max_lifetime: float, names: HeaderNames,
        cache_size: int, clock: Callable[[], float] = time.time, verified: Callable[[], None] | None = None,
    ) -> None:
        self.by_iss = {issuer.issuer: issuer for issuer in issuers if issuer.issuer is not None}
        self.default = next((issuer for issuer in issuers if issuer.issuer is None), None)
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.names = names
        self.cache_size = cache_size
        self.clock = clock
        self.verified = verified
        self._cache: dict[bytes, tuple[Identity, Issuer, KeySet | None]] = {}

    async def identity(self, token: str) -> Identity:
        now = self.clock()
        if not self.cache_size:
            return (await self._verify(token, now))[0]
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            identity, issuer, keys = cached
            if (identity.expires is None or now <= identity.expires + self.leeway) and issuer.keys.fresh() is keys:
                return identity
            del self._cache[digest]
        identity, issuer, keys = await self._verify(token, now)
        if len(self._cache) >= self.cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[digest] = (identity, issuer, keys)
        return identity

    async def _verify(self, token: str, now: float) -> tuple[Identity, Issuer, KeySet | None]:
        if self.verified is not None:
            self.verified()
        parsed = parse_token(token)
        issuer = self.issuer_for(parsed.claims)
        algorithm = parsed.header["alg"]
        if algorithm not in issuer.algorithms:
            raise Refused("algorithm")
        if issuer.typ is not None and not _typ_matches(issuer.typ, parsed.header.get("typ")):
            raise Refused("invalid_claims")
        candidates = await issuer.keys.candidates(algorithm, parsed.header.get("kid"))
        keys = issuer.keys.current  # the set the candidates came from (no await in between)
        if not candidates:
            raise Refused("unknown_key")
        if not any(verify(algorithm, parsed.signing_input, key, parsed.signature)
                   for key in candidates[:MAX_KEYS_TRIED]):
            raise Refused("bad_signature")
        return self.check_claims(parsed.claims, issuer, now), issuer, keys

    def issuer_for(self, claims: dict[str, Any]) -> Issuer:
        iss = claims.get("iss")
        issuer = self.by_iss.get(iss) if isinstance(iss, str) else None
        issuer = issuer or self.default
        if issuer is None:
            raise Refused("unknown_issuer")
        return issuer

    def check_claims(self, claims: dict[str, Any], issuer: Issuer, now: float) -> Identity:
        for name in issuer.required_claims:
            if name not in claims:
                raise Refused("invalid_claims")
        expires, not_before, issued_at = _number(claims, "exp"), _number(claims, "nbf"), _number(claims, "iat")
        if expires is not None and now > expires + self.leeway:
            raise Refused("expired")
        if not_before is not None and now + self.leeway < not_before:
            raise Refused("not_yet_valid")
        if issued_at is not None and now + self.leeway < issued_at:
            raise Refused("not_yet_valid")
        if expires is not None and expires - (issued_at if issued_at is not None else now) > self.max_lifetime:
            raise Refused("invalid_claims")
        if issuer.audience:
            audience = claims.get("aud")
            audience = [audience] if isinstance(audience, str) else audience
            if not isinstance(audience, list) or not issuer.audience.intersection(
                    value for value in audience if isinstance(value, str)):
                raise Refused("invalid_claims")
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not jti or len(jti) > 256):
            raise Refused("invalid_claims")
        return build_identity(
            self.names,
            consumer_id(claim_value(claims, issuer.consumer_claim)),
            name_list(claim_value(claims, issuer.roles_claim), spaces=True) if issuer.roles_claim else (),
            name_list(claim_value(claims, issuer.scopes_claim), spaces=False) if issuer.scopes_claim else (),
            claims, jti=jti, issued_at=issued_at, expires=expires, revocable=True,
        )
