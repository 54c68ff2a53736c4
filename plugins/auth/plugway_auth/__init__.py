"""Authentication for Plugway: JWTs (several issuers, JWKS or configured keys), API keys,
revocation through the shared store, and an optional OAuth2 token endpoint.

``on_request`` establishes who is calling (``ctx.consumer``) or refuses with 401 (503 when
the identity provider's keys or the revocation store cannot answer); ``before_upstream``
sends the identity headers upstream, and answers the token endpoint's paths (after the
other plugins' ``on_request``, so the rate limiting plugin limits them like any route).
This module holds the settings and the hook glue; the logic is in ``policy`` and the
modules it uses. See README.md.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import aiohttp

from gateway import Duration, PluginDeclaration, Secret, Size, hookimpl, setting
from gateway.store import StoreUnavailable

from . import apikeys, credentials, keys, passwords
from .admin import revocation_handler
from .cli import add_commands
from .errors import AuthUnavailable, Refused, client_error
from .identity import ANONYMOUS, header_safe
from .jwks import JwksSource
from .policy import Policy, compile_issuer
from .revocation import RevocationView

NAME = "auth"
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")
_ENDPOINT = object()  # ctx.state marker: the request is for the token endpoint


def _header_names(settings: Any) -> list[tuple[str, str]]:
    names = [(key, getattr(settings, key)) for key in ("consumer_header", "roles_header", "scopes_header")]
    names += [("claim_headers", name) for name in settings.claim_headers]
    return [(key, name) for key, name in names if name]


def _problems_in_names(key: str, names: tuple[str, ...], *, spaces: bool) -> Iterator[tuple[str, str]]:
    for name in names:
        if not name or not header_safe(name) or "," in name or not spaces and " " in name:
            yield key, f"{name!r} must be visible ASCII without commas" + ("" if spaces else " or spaces")


# --- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HmacKeySettings:
    secret: Secret = setting(
        doc='The shared secret, { env = "NAME" } or { file = "/path" }: 32 bytes or more (48: HS384, 64: HS512).',
    )
    kid: str | None = setting(None, doc="Key id; a token naming another kid is not checked with this key.")


@dataclass(frozen=True)
class PublicKeySettings:
    file: str = setting(doc="PEM file with a public key or an X.509 certificate (RSA 2048 bits or more, EC, Ed25519).")
    kid: str | None = setting(None, doc="Key id; a token naming another kid is not checked with this key.")

    def validate(self) -> Iterator[tuple[str, str]]:
        try:
            with open(self.file, "rb") as file:
                keys.public_key_from_pem(file.read())
        except OSError as exc:
            yield "file", f"cannot read {self.file}: {exc.strerror}"
        except ValueError as exc:
            yield "file", f"{self.file} holds no usable public key: {exc}"


@dataclass(frozen=True)
class IssuerSettings:
    name: str = setting(doc="Name of this issuer in metrics and logs.")
    algorithms: tuple[str, ...] = setting(
        doc='Algorithms accepted from this issuer, e.g. ["RS256"]: HMAC or public-key ones, not both; never "none".',
    )
    issuer: str | None = setting(
        None, doc="The iss claim, compared exactly; it matches tokens to issuers (unset: tokens no issuer claims).",
    )
    audience: tuple[str, ...] = setting((), doc="Accepted aud values; a token must name one (empty: aud not checked).")
    jwks_url: str | None = setting(None, doc="URL of the issuer's JWKS document (http or https).")
    public_keys: tuple[PublicKeySettings, ...] = setting((), doc="Public keys from PEM files, instead of a JWKS URL.")
    hmac_keys: tuple[HmacKeySettings, ...] = setting((), doc="Shared secrets, for HS256/HS384/HS512.")
    typ: str | None = setting(None, doc='Required typ header, e.g. "at+jwt" (RFC 9068); "application/" may prefix it.')
    required_claims: tuple[str, ...] = setting(
        ("exp",), doc="Claims a token must have; exp is in the default (removing it accepts tokens that never expire).",
    )
    consumer_claim: str = setting("sub", doc="Claim holding the consumer id (a dotted path reaches into objects).")
    roles_claim: str | None = setting("roles", doc="Claim holding the roles: an array or a space-separated string.")
    scopes_claim: str | None = setting("scope", doc="Claim holding the scopes: a space-separated string or an array.")
    jwks_min_refresh: Duration = setting(
        Duration("30s"), doc="Least time between two JWKS fetches (a token naming an unknown kid triggers one).",
    )
    jwks_default_ttl: Duration = setting(Duration("5m"), doc="How long keys are kept when the response has no max-age.")
    jwks_max_ttl: Duration = setting(Duration("1d"), doc="Longest a key set is kept, whatever its max-age says.")
    jwks_timeout: Duration = setting(Duration("5s"), doc="Time limit of one JWKS fetch.")
    jwks_max_size: Size = setting(Size("256KiB"), doc="Largest JWKS response accepted.")
    jwks_max_keys: int = setting(32, doc="Most keys a JWKS document may hold.")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.algorithms:
            yield "algorithms", "needs at least one algorithm"
        for algorithm in self.algorithms:
            if algorithm not in keys.ALGORITHMS:
                yield "algorithms", f"{algorithm!r} is not accepted; use {', '.join(keys.ALGORITHMS)}"
        hmac = [algorithm for algorithm in self.algorithms if algorithm.startswith("HS")]
        if hmac and len(hmac) != len(self.algorithms):
            yield "algorithms", "mixes HMAC and public-key algorithms; configure two issuers"
        sources = [bool(self.jwks_url), bool(self.public_keys), bool(self.hmac_keys)]
        if sum(sources) != 1:
            yield "", "needs exactly one of jwks_url, public_keys and hmac_keys"
        elif hmac and not self.hmac_keys or not hmac and self.hmac_keys:
            yield "hmac_keys", "HMAC algorithms need hmac_keys, and hmac_keys need HMAC algorithms"
        shortest = max((keys.HMAC_MIN_BYTES.get(algorithm, 0) for algorithm in self.algorithms), default=0)
        for key in self.hmac_keys:
            if len(key.secret.value.encode()) < shortest:
                yield "hmac_keys", f"the secret from {key.secret.name} is shorter than {shortest} bytes (RFC 7518)"
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            yield "jwks_url", "must be an http:// or https:// URL"
        if self.jwks_min_refresh > self.jwks_max_ttl or self.jwks_timeout <= 0 or self.jwks_max_keys < 1:
            yield "jwks_min_refresh", "needs jwks_min_refresh <= jwks_max_ttl, a jwks_timeout and jwks_max_keys >= 1"
        if not self.consumer_claim:
            yield "consumer_claim", "must not be empty"


@dataclass(frozen=True)
class ApiKeySettings:
    hash: str = setting(parse=apikeys.parse_hash, doc='"sha256:" and the key\'s SHA-256 in hex (`plugway apikey new`).')
    consumer: str = setting(doc="Consumer id the key authenticates as; several keys may share one (rotation).")
    roles: tuple[str, ...] = setting((), doc="Roles of the consumer.")
    scopes: tuple[str, ...] = setting((), doc="Scopes of the consumer.")
    expires: datetime.datetime | None = setting(
        None, parse=apikeys.parse_time, render=lambda value: value,
        doc="When the key stops working: a date-time with a time zone, e.g. 2027-01-31T00:00:00Z.",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.consumer or not header_safe(self.consumer) or self.consumer == ANONYMOUS:
            yield "consumer", f'must be visible ASCII and not "{ANONYMOUS}"'
        yield from _problems_in_names("roles", self.roles, spaces=True)
        yield from _problems_in_names("scopes", self.scopes, spaces=False)


@dataclass(frozen=True)
class SigningKeySettings:
    kid: str = setting(doc="Key id, published in the JWKS and named by every token this key signs.")
    algorithm: Literal["RS256", "ES256"] = setting(doc="RS256 (RSA key, 2048 bits or more) or ES256 (P-256 key).")
    private_key: Secret = setting(
        doc='Unencrypted PEM private key: { file = "/etc/plugway/signing.pem" } or { env = "NAME" }.',
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        try:
            key = keys.private_key_from_pem(self.private_key.value.encode())
        except (ValueError, TypeError) as exc:
            yield "private_key", f"is not a usable PEM private key: {exc}"
            return
        if keys.kind_of(key) != keys.kind_for(self.algorithm):
            yield "private_key", f"does not fit {self.algorithm}"


@dataclass(frozen=True)
class ClientSettings:
    id: str = setting(doc="The client_id.")
    secret_hash: str = setting(doc="The client secret's salted scrypt hash (`plugway oauth-client new`).")
    scopes: tuple[str, ...] = setting((), doc="Scopes the client may request (all of them when it names none).")
    roles: tuple[str, ...] = setting((), doc="Roles written into the client's access tokens.")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.id or not header_safe(self.id) or " " in self.id or self.id == ANONYMOUS:
            yield "id", f'must be visible ASCII without spaces and not "{ANONYMOUS}"'
        try:
            passwords.parse_secret_hash(self.secret_hash)
        except ValueError as exc:
            yield "secret_hash", str(exc)
        yield from _problems_in_names("scopes", self.scopes, spaces=False)
        yield from _problems_in_names("roles", self.roles, spaces=True)


@dataclass(frozen=True)
class TokenEndpointSettings:
    issuer: str = setting(doc="The iss of the tokens it issues, e.g. https://api.example.com.")
    signing_keys: tuple[SigningKeySettings, ...] = setting(
        doc="Signing keys; the first signs, all are published (add the next one at the end before a rotation).",
    )
    clients: tuple[ClientSettings, ...] = setting((), doc="The clients that may get tokens.")
    audience: tuple[str, ...] = setting((), doc="The aud of issued tokens (and required of them on every route).")
    token_path: str = setting("/oauth/token", doc="Path of the token endpoint (POST).")
    jwks_path: str = setting("/.well-known/jwks.json", doc="Path publishing the public keys (GET).")
    revoke_path: str = setting("/oauth/revoke", doc="Path of the revocation endpoint, RFC 7009 (POST).")
    introspect_path: str = setting("/oauth/introspect", doc="Path of the introspection endpoint, RFC 7662 (POST).")
    access_token_ttl: Duration = setting(Duration("5m"), doc="Lifetime of access tokens.")
    refresh_token_ttl: Duration = setting(
        Duration("0s"), doc="Lifetime of refresh tokens, renewed at each rotation (0s: no refresh tokens).",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.signing_keys:
            yield "signing_keys", "needs at least one key"
        kids = [key.kid for key in self.signing_keys]
        if len(set(kids)) != len(kids):
            yield "signing_keys", "key ids must be unique"
        paths = [self.token_path, self.jwks_path, self.revoke_path, self.introspect_path]
        if len(set(paths)) != len(paths) or not all(path.startswith("/") for path in paths):
            yield "token_path", "the four paths must be distinct and start with /"
        ids = [client.id for client in self.clients]
        if len(set(ids)) != len(ids):
            yield "clients", "client ids must be unique"
        if self.access_token_ttl < 1:
            yield "access_token_ttl", "must be at least 1s"


@dataclass(frozen=True)
class AuthSettings:
    issuers: tuple[IssuerSettings, ...] = setting((), doc="JWT issuers, as [[plugins.auth.issuers]] tables.")
    api_keys: tuple[ApiKeySettings, ...] = setting(
        (), doc="API keys (hashes only), as [[plugins.auth.api_keys]] tables.",
    )
    token_sources: tuple[credentials.Source, ...] = setting(
        (credentials.Source("bearer"),), parse=credentials.parse_sources, render=credentials.render_sources,
        doc='Where tokens are read: "bearer", "header:NAME", "cookie:NAME", "query:NAME", "subprotocol".',
    )
    api_key_header: str | None = setting("X-API-Key", doc="Header carrying an API key.")
    api_key_query: str | None = setting(None, doc="Query parameter carrying an API key (keys in URLs end up in logs).")
    anonymous: bool = setting(False, doc='Let requests without credentials through as consumer "anonymous".')
    leeway: Duration = setting(Duration("30s"), doc="Clock skew allowed when checking exp, nbf and iat.")
    max_lifetime: Duration = setting(
        Duration("1d"), doc="Longest token lifetime accepted: exp minus iat (or minus now).",
    )
    max_token_size: Size = setting(Size("8KiB"), doc="Longer tokens are refused before they are parsed.")
    check_revocation: bool = setting(True, doc="Check every token against the revocations in the shared store.")
    on_store_error: Literal["fail_closed", "fail_open"] = setting(
        "fail_closed", doc="When the store cannot say whether a token is revoked: 503, or accept the token.",
    )
    cache_size: int = setting(10000, doc="Verified tokens cached per worker and route configuration (0: none).")
    consumer_header: str | None = setting("X-Consumer-ID", doc="Upstream header with the consumer id.")
    roles_header: str | None = setting("X-Consumer-Roles", doc="Upstream header with the roles, comma-separated.")
    scopes_header: str | None = setting("X-Consumer-Scopes", doc="Upstream header with the scopes, space-separated.")
    claim_headers: Mapping[str, str] = setting(
        factory=lambda: MappingProxyType({}),
        doc='More upstream headers from claims, e.g. { X-Consumer-Username = "preferred_username" }.',
    )
    hide_credentials: bool = setting(False, doc="Remove the token or API key from the request sent upstream.")
    realm: str = setting("plugway", doc="The realm of WWW-Authenticate challenges.")
    token_endpoint: TokenEndpointSettings | None = setting(
        None, doc="The gateway's own OAuth2 token endpoint, off unless this table is present.",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if not (self.issuers or self.api_keys or self.token_endpoint or self.anonymous):
            yield "", "configure issuers, api_keys or token_endpoint (or anonymous = true)"
        names = [issuer.name for issuer in self.issuers]
        if len(set(names)) != len(names):
            yield "issuers", "issuer names must be unique"
        claimed = [issuer.issuer for issuer in self.issuers if issuer.issuer is not None]
        if self.token_endpoint is not None:
            claimed.append(self.token_endpoint.issuer)
        if len(set(claimed)) != len(claimed):
            yield "issuers", "two issuers (or an issuer and the token endpoint) claim the same iss"
        if sum(issuer.issuer is None for issuer in self.issuers) > 1:
            yield "issuers", "at most one issuer may leave `issuer` unset"
        for key, name in _header_names(self) + [("api_key_header", self.api_key_header or "x")]:
            if not _HEADER_NAME.fullmatch(name):
                yield key, f"{name!r} is not a header name (letters, digits and '-')"
        if not re.fullmatch(r"[A-Za-z0-9 ._-]+", self.realm):
            yield "realm", "may hold only letters, digits, spaces and . _ -"
        if self.cache_size < 0 or self.max_token_size < 64:
            yield "cache_size", "cache_size must be 0 or more and max_token_size at least 64B"
        if self.leeway > 300:
            yield "leeway", "more than 5m of clock skew is not a sensible leeway"

    def validate_with(self, gateway_settings: Any) -> Iterator[tuple[str, str]]:
        """Identity headers must be ones the core drops from every client request."""
        protected = {name.lower() for name in gateway_settings.server.identity_headers}
        for key, name in _header_names(self):
            if name.lower() not in protected:
                yield key, (f"{name} must be listed in server.identity_headers, so that the gateway removes "
                            "clients' copies of it on every route")

    @property
    def longest_life(self) -> float:
        return float(self.max_lifetime + self.leeway)


# --- hooks -------------------------------------------------------------------------------------------


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=AuthSettings, priority=1000)


@dataclass
class WorkerState:
    """Per worker: compiled route policies, shared issuers and JWKS sources, metrics."""

    gateway: Any
    failures: Any
    jwks_fetches: Any
    store_errors: Any
    endpoint_requests: Any
    verifications: Any
    session: aiohttp.ClientSession
    revocations: RevocationView
    policies: dict[int, Any] = field(default_factory=dict)
    issuers: dict[Any, Any] = field(default_factory=dict)
    jwks: dict[tuple, Any] = field(default_factory=dict)

    def policy(self, settings: AuthSettings):
        found = self.policies.get(id(settings))
        if found is None:
            for issuer in settings.issuers:
                if issuer not in self.issuers:
                    self.issuers[issuer] = self._issuer(issuer)
            found = self.policies[id(settings)] = Policy(
                settings, issuers=self.issuers, revocations=self.revocations,
                store_failed=lambda policy: self.store_errors.labels(policy).inc(),
                endpoint_counted=lambda endpoint, result: self.endpoint_requests.labels(endpoint, result).inc(),
                verified=self.verifications.inc,
            )
        return found

    def _issuer(self, settings: IssuerSettings):
        def source(issuer: IssuerSettings) -> JwksSource:
            key = (issuer.jwks_url, issuer.jwks_min_refresh, issuer.jwks_default_ttl, issuer.jwks_max_ttl,
                   issuer.jwks_timeout, issuer.jwks_max_size, issuer.jwks_max_keys)
            if key not in self.jwks:
                self.jwks[key] = JwksSource(
                    issuer.name, issuer.jwks_url, session=lambda: self.session,
                    fetched=lambda name, result: self.jwks_fetches.labels(name, result).inc(),
                    min_refresh=issuer.jwks_min_refresh, default_ttl=issuer.jwks_default_ttl,
                    max_ttl=issuer.jwks_max_ttl, timeout=issuer.jwks_timeout, max_size=issuer.jwks_max_size,
                    max_keys=issuer.jwks_max_keys,
                )
                self.jwks[key].start()
            return self.jwks[key]

        return compile_issuer(settings, source)


def _own_settings(gateway: Any) -> list[AuthSettings]:
    """This plugin's distinct settings objects in this configuration (routes share the global one)."""
    return list({id(settings): settings for settings in gateway.plugin_settings(NAME).values()}.values())


@hookimpl
def worker_started(gateway):
    metrics = gateway.metrics
    state = gateway.state[NAME] = WorkerState(
        gateway=gateway,
        failures=metrics.counter("plugway_auth_failures_total", "Requests refused by the auth plugin, by reason.",
                                 ("reason",)),
        jwks_fetches=metrics.counter("plugway_auth_jwks_fetches_total", "JWKS fetches, by issuer and result.",
                                     ("issuer", "result")),
        store_errors=metrics.counter(
            "plugway_auth_store_errors_total", "Revocation checks the store could not answer, by the policy applied.",
            ("policy",),
        ),
        endpoint_requests=metrics.counter("plugway_auth_token_endpoint_requests_total",
                                          "Token endpoint requests, by endpoint and result.", ("endpoint", "result")),
        verifications=metrics.counter(
            "plugway_auth_token_verifications_total",
            "Tokens checked in full (signature and claims), not answered from the verified-token cache.",
            per_request=True,
        ),
        session=aiohttp.ClientSession(),
        revocations=RevocationView(gateway.store),
    )
    for settings in _own_settings(gateway):
        state.policy(settings)  # compile now: keys loaded, JWKS fetches started


@hookimpl
async def worker_stopping(gateway):
    state = gateway.state.get(NAME)
    if state is not None:
        for source in state.jwks.values():
            source.stop()
        await state.session.close()


@hookimpl
async def on_request(ctx, settings):
    state = ctx.gateway.state[NAME]
    policy = state.policy(settings)
    if policy.endpoint is not None and ctx.path in policy.endpoint.paths:
        ctx.state[NAME] = _ENDPOINT  # answered in before_upstream, once rate limits have passed
        return None
    try:
        identity = await policy.authenticate(ctx.request.headers, ctx.query)
    except Refused as refused:
        state.failures.labels(refused.reason).inc()
        raise client_error(refused.reason, settings.realm) from None
    ctx.consumer = identity.consumer
    ctx.state[NAME] = identity
    return None


@hookimpl
async def before_upstream(ctx, settings, outgoing):
    state = ctx.gateway.state[NAME]
    policy = state.policy(settings)
    identity = ctx.state.get(NAME)
    if identity is _ENDPOINT:
        try:
            return await policy.endpoint.answer(ctx, ctx.gateway.store)
        except StoreUnavailable:
            raise AuthUnavailable("the token service cannot reach its store", headers=[("Retry-After", "1")]) from None
    if identity is not None and identity.headers:
        headers = outgoing.headers
        for name, value in identity.headers:
            headers[name] = value
    policy.hide(outgoing)
    return None


@hookimpl
def admin_routes(gateway):
    own = _own_settings(gateway) or [AuthSettings(anonymous=True)]
    longest, leeway = max(settings.longest_life for settings in own), max(float(settings.leeway) for settings in own)
    return [("POST", "/auth/revocations", revocation_handler(lambda: gateway.store, longest, leeway))]


@hookimpl
def cli_commands(commands):
    add_commands(commands)
