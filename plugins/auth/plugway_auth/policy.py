"""One configuration of the plugin (a route's settings), compiled once per worker.

``Policy.authenticate`` is the whole request-time decision: which credential the request
presents, whether it is valid, whether it was revoked; it returns the ``Identity`` or
raises ``Refused``. Issuers (and so their JWKS caches) are shared by every route whose
settings name the same issuer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.store import StoreUnavailable

from . import credentials
from .apikeys import ApiKey, ApiKeyTable
from .errors import Refused
from .identity import HeaderNames, Identity, anonymous_identity, build_identity
from .keys import KeySet, VerificationKey, kind_of, private_key_from_pem, public_jwk, public_key_from_pem
from .passwords import parse_secret_hash
from .revocation import RevocationView
from .token_endpoint import Client, SigningKey, TokenEndpoint
from .tokens import Issuer, StaticKeys, TokenVerifier

REQUIRED_OWN_CLAIMS = ("exp", "iat", "jti", "sub")


def header_names(settings: Any) -> HeaderNames:
    return HeaderNames(settings.consumer_header, settings.roles_header, settings.scopes_header,
                       tuple(settings.claim_headers.items()))


def compile_issuer(settings: Any, jwks_source: Callable[[Any], Any]) -> Issuer:
    if settings.jwks_url is not None:
        keys = jwks_source(settings)
    else:
        loaded = [VerificationKey(hmac.secret.value.encode(), "hmac", hmac.kid) for hmac in settings.hmac_keys]
        for entry in settings.public_keys:
            with open(entry.file, "rb") as file:
                key = public_key_from_pem(file.read())
            loaded.append(VerificationKey(key, kind_of(key), entry.kid))
        keys = StaticKeys(KeySet(loaded))
    return Issuer(
        name=settings.name, issuer=settings.issuer, audience=frozenset(settings.audience),
        algorithms=frozenset(settings.algorithms), typ=settings.typ.lower() if settings.typ else None,
        required_claims=settings.required_claims, consumer_claim=settings.consumer_claim,
        roles_claim=settings.roles_claim, scopes_claim=settings.scopes_claim, keys=keys,
    )


def compile_api_keys(settings: Any, names: HeaderNames) -> ApiKeyTable:
    keys = []
    for entry in settings.api_keys:
        identity = build_identity(names, entry.consumer, entry.roles, entry.scopes)
        expires = entry.expires.timestamp() if entry.expires is not None else None
        keys.append(ApiKey(bytes.fromhex(entry.hash.partition(":")[2]), identity, expires))
    return ApiKeyTable(keys)


def compile_endpoint(
    settings: Any, names: HeaderNames, counted: Callable[[str, str], None],
) -> tuple[TokenEndpoint, Issuer]:
    """The token endpoint, and the issuer that lets every route accept the tokens it issues."""
    endpoint = settings.token_endpoint
    signing = []
    for entry in endpoint.signing_keys:
        signing.append(SigningKey(entry.kid, entry.algorithm, private_key_from_pem(entry.private_key.value.encode())))
    public = [VerificationKey(key.private_key.public_key(), kind_of(key.private_key), key.kid, key.algorithm)
              for key in signing]
    issuer = Issuer(
        name="token_endpoint", issuer=endpoint.issuer, audience=frozenset(endpoint.audience),
        algorithms=frozenset(key.algorithm for key in signing), typ="at+jwt", required_claims=REQUIRED_OWN_CLAIMS,
        consumer_claim="sub", roles_claim="roles", scopes_claim="scope", keys=StaticKeys(KeySet(public)),
    )
    verifier = TokenVerifier([issuer], leeway=settings.leeway, max_lifetime=settings.max_lifetime, names=names,
                             cache_size=0)
    paths = {endpoint.token_path: "token", endpoint.jwks_path: "jwks", endpoint.revoke_path: "revoke",
             endpoint.introspect_path: "introspect"}
    clients = {client.id: Client(client.id, parse_secret_hash(client.secret_hash), client.scopes, client.roles)
               for client in endpoint.clients}
    service = TokenEndpoint(
        issuer=endpoint.issuer, audience=endpoint.audience, paths=paths, clients=clients, signing_keys=signing,
        jwks=[public_jwk(key.private_key, key.kid, key.algorithm) for key in signing],
        access_ttl=endpoint.access_token_ttl, refresh_ttl=endpoint.refresh_token_ttl, verifier=verifier,
        leeway=settings.leeway, realm=settings.realm, counted=counted,
    )
    return service, issuer


class Policy:
    """How one route authenticates (see the module docstring)."""

    def __init__(
        self, settings: Any, *, issuers: Mapping[Any, Issuer], revocations: RevocationView,
        store_failed: Callable[[str], None], endpoint_counted: Callable[[str, str], None],
        verified: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.names = header_names(settings)
        compiled = [issuers[issuer] for issuer in settings.issuers]
        self.endpoint: TokenEndpoint | None = None
        if settings.token_endpoint is not None:
            self.endpoint, own = compile_endpoint(settings, self.names, endpoint_counted)
            compiled.append(own)
        self.verifier = TokenVerifier(
            compiled, leeway=settings.leeway, max_lifetime=settings.max_lifetime, names=self.names,
            cache_size=settings.cache_size, verified=verified,
        ) if compiled else None
        self.api_keys = compile_api_keys(settings, self.names)
        self.token_sources = settings.token_sources if compiled else ()
        key_sources = []
        if self.api_keys and settings.api_key_header:
            key_sources.append(credentials.Source("header", settings.api_key_header))
        if self.api_keys and settings.api_key_query:
            key_sources.append(credentials.Source("query", settings.api_key_query))
        self.key_sources = tuple(key_sources)
        self.anonymous = anonymous_identity(self.names) if settings.anonymous else None
        self.revocations = revocations if settings.check_revocation else None
        self.store_failed = store_failed
        self.max_token_size = settings.max_token_size

    async def authenticate(self, headers: Any, query: str) -> Identity:
        found = credentials.presented(headers, query, self.token_sources, self.key_sources)
        if len(found) > 1:
            raise Refused("ambiguous")
        if not found:
            if self.anonymous is not None:
                return self.anonymous
            raise Refused("missing")
        kind, value = found[0]
        if kind == "api_key":
            return self.api_keys.identity(value, time.time())
        if len(value) > self.max_token_size:
            raise Refused("too_large")
        identity = await self.verifier.identity(value)
        if self.revocations is not None and await self._revoked(identity):
            raise Refused("revoked")
        return identity

    async def _revoked(self, identity: Identity) -> bool:
        try:
            return await self.revocations.revoked(identity.jti, identity.consumer.id, identity.issued_at)
        except StoreUnavailable:
            policy = self.settings.on_store_error
            self.store_failed(policy)
            if policy == "fail_closed":
                raise Refused("store_unavailable") from None
            return False

    def hide(self, outgoing: Any) -> None:
        """Remove credentials from the request sent upstream (a bearer subprotocol always)."""
        sources = [*self.token_sources, *self.key_sources] if self.settings.hide_credentials else []
        sources += [source for source in self.token_sources if source.kind == "subprotocol" and source not in sources]
        for source in sources:
            outgoing.query = credentials.remove(source, outgoing.headers, outgoing.query)
