"""The gateway as a small OAuth2 authorization server for machine clients.

- ``POST token_path``: the client credentials grant (RFC 6749 section 4.4) and, when
  ``refresh_token_ttl`` is set, the refresh token grant with rotation: every use returns a
  new refresh token, and a refresh token used twice revokes its whole family (every refresh
  token and every access token issued from it), as the OAuth 2.0 Security BCP recommends.
- ``GET jwks_path``: the public keys of every configured signing key (several during a
  rotation); the first signing key signs.
- ``POST revoke_path`` (RFC 7009) and ``POST introspect_path`` (RFC 7662).

Clients authenticate with HTTP Basic or ``client_id``/``client_secret`` in the form body,
never both. Access tokens are JWTs (``typ: at+jwt``, RFC 9068 claims) the plugin itself
accepts on every route; refresh tokens are opaque random strings whose records live in the
shared store. Errors use the OAuth JSON shape (``{"error": ..., "error_description": ...}``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import jwt

from gateway import Response
from gateway.store import Store

from .errors import Refused
from .passwords import SecretHash, verify_secret
from .revocation import revoke_token, revoked_now
from .tokens import TokenVerifier

MAX_FORM = 16 * 1024
REFRESH_PREFIX = "rt_"
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))


@dataclass(frozen=True)
class Client:
    id: str
    secret: SecretHash
    scopes: tuple[str, ...]
    roles: tuple[str, ...]


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: Any


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str, *, basic_realm: str | None = None) -> None:
        super().__init__(description)
        self.status, self.error, self.description, self.basic_realm = status, error, description, basic_realm

    def response(self) -> Response:
        headers = list(NO_STORE)
        if self.basic_realm is not None:
            headers.append(("WWW-Authenticate", f'Basic realm="{self.basic_realm}"'))
        return Response.json({"error": self.error, "error_description": self.description}, self.status, headers)


class TokenEndpoint:
    """Answers the token, JWKS, revocation and introspection paths of one configuration."""

    def __init__(
        self, *, issuer: str, audience: tuple[str, ...], paths: dict[str, str], clients: dict[str, Client],
        signing_keys: list[SigningKey], jwks: list[dict[str, Any]], access_ttl: float, refresh_ttl: float,
        verifier: TokenVerifier, leeway: float, realm: str, counted: Callable[[str, str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.paths = paths
        self.clients = clients
        self.signing_key = signing_keys[0]
        self.jwks_body = json.dumps({"keys": jwks}, separators=(",", ":")).encode()
        self.access_ttl = int(access_ttl)
        self.refresh_ttl = refresh_ttl
        self.verifier = verifier
        self.leeway = leeway
        self.realm = realm
        self.counted = counted
        self.clock = clock

    async def answer(self, ctx: Any, store: Store) -> Response:
        endpoint = self.paths[ctx.path]
        if endpoint == "jwks":
            if ctx.method not in ("GET", "HEAD"):
                return Response(405, b"", [("Allow", "GET, HEAD")])
            return Response(200, self.jwks_body, [("Cache-Control", "public, max-age=300")],
                            content_type="application/json")
        if ctx.method != "POST":
            return Response(405, b"", [("Allow", "POST")])
        try:
            form = await _form(ctx)
            client = await self._client(ctx, form)
            handler = {"token": self._token, "revoke": self._revoke, "introspect": self._introspect}[endpoint]
            response = await handler(form, client, store)
        except OAuthError as error:
            self.counted(endpoint, error.error)
            return error.response()
        self.counted(endpoint, "ok")
        return response

    # --- client authentication ----------------------------------------------------------------

    async def _client(self, ctx: Any, form: dict[str, str]) -> Client:
        headers = ctx.request.headers.getall("Authorization", ())
        if len(headers) > 1:
            raise OAuthError(400, "invalid_request", "more than one Authorization header")
        basic = headers[0].strip() if headers and headers[0].strip()[:6].lower() == "basic " else None
        if basic is not None:
            if "client_secret" in form:
                raise OAuthError(400, "invalid_request", "use one client authentication method")
            client_id, secret = _basic_credentials(basic[6:].strip(), self.realm)
        elif "client_id" in form and "client_secret" in form:
            client_id, secret = form["client_id"], form["client_secret"]
        else:
            raise OAuthError(401, "invalid_client", "client authentication is required", basic_realm=self.realm)
        client = self.clients.get(client_id)
        realm = self.realm if basic is not None else None
        if client is None or not await asyncio.to_thread(verify_secret, secret, client.secret):
            raise OAuthError(401, "invalid_client", "client authentication failed", basic_realm=realm)
        return client

    # --- the token endpoint -------------------------------------------------------------------

    async def _token(self, form: dict[str, str], client: Client, store: Store) -> Response:
        grant = form.get("grant_type")
        if grant == "client_credentials":
            scopes = _scopes(form.get("scope"), client.scopes)
            return Response.json(await self._issue(client, scopes, store, family=None), headers=NO_STORE)
        if grant == "refresh_token" and self.refresh_ttl:
            return Response.json(await self._refresh(form, client, store), headers=NO_STORE)
        if grant is None:
            raise OAuthError(400, "invalid_request", "grant_type is required")
        raise OAuthError(400, "unsupported_grant_type", "this grant type is not supported")

    async def _issue(self, client: Client, scopes: tuple[str, ...], store: Store, family: str | None) -> dict:
        now = int(self.clock())
        jti = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {"iss": self.issuer, "sub": client.id, "client_id": client.id, "iat": now,
                                  "exp": now + self.access_ttl, "jti": jti, "scope": " ".join(scopes)}
        if self.audience:
            claims["aud"] = self.audience[0] if len(self.audience) == 1 else list(self.audience)
        if client.roles:
            claims["roles"] = list(client.roles)
        key = self.signing_key
        access = jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "at+jwt"})
        answer = {"access_token": access, "token_type": "Bearer", "expires_in": self.access_ttl,
                  "scope": claims["scope"]}
        if self.refresh_ttl:
            family = family or secrets.token_urlsafe(16)
            refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
            record = {"client": client.id, "family": family, "scope": claims["scope"],
                      "exp": now + int(self.refresh_ttl)}
            await store.set(_refresh_key(refresh), json.dumps(record).encode(), self.refresh_ttl)
            await store.set_add(_family_tokens_key(family), f"{jti} {claims['exp']}",
                                ttl=self.refresh_ttl + self.access_ttl)
            answer["refresh_token"] = refresh
        return answer

    async def _refresh(self, form: dict[str, str], client: Client, store: Store) -> dict:
        token = form.get("refresh_token")
        if not token:
            raise OAuthError(400, "invalid_request", "refresh_token is required")
        record = await _refresh_record(store, token)
        if record is None or record["client"] != client.id or await store.get(_family_key(record["family"])):
            raise OAuthError(400, "invalid_grant", "the refresh token is not valid")
        if not await store.add(_used_key(token), b"1", self.refresh_ttl):
            await self._revoke_family(record["family"], store)
            self.counted("token", "refresh_reused")
            raise OAuthError(400, "invalid_grant", "the refresh token is not valid")
        granted = tuple(record["scope"].split())
        scopes = _scopes(form.get("scope"), granted) if "scope" in form else granted
        return await self._issue(client, scopes, store, family=record["family"])

    async def _revoke_family(self, family: str, store: Store) -> None:
        """Refresh tokens of the family stop working; its access tokens are revoked by jti."""
        await store.set(_family_key(family), b"revoked", self.refresh_ttl)
        now = self.clock()
        for member in await store.set_members(_family_tokens_key(family)):
            jti, _, expires = member.partition(" ")
            if float(expires) + self.leeway > now:
                await revoke_token(store, jti, float(expires) + self.leeway - now)

    # --- RFC 7009 and RFC 7662 ----------------------------------------------------------------

    async def _revoke(self, form: dict[str, str], client: Client, store: Store) -> Response:
        token = form.get("token")
        if not token:
            raise OAuthError(400, "invalid_request", "token is required")
        if token.startswith(REFRESH_PREFIX):
            record = await _refresh_record(store, token)
            if record is not None and record["client"] == client.id:
                await self._revoke_family(record["family"], store)
        else:
            claims = await self._own_claims(token)
            if claims is not None and claims.get("client_id") == client.id and "jti" in claims:
                await revoke_token(store, claims["jti"], claims["exp"] + self.leeway - self.clock())
        return Response(200, b"", NO_STORE)  # RFC 7009: the same answer for unknown tokens

    async def _introspect(self, form: dict[str, str], client: Client, store: Store) -> Response:
        token = form.get("token")
        if not token:
            raise OAuthError(400, "invalid_request", "token is required")
        inactive = Response.json({"active": False}, headers=NO_STORE)
        if token.startswith(REFRESH_PREFIX):
            record = await _refresh_record(store, token)
            if (record is None or await store.get(_used_key(token))
                    or await store.get(_family_key(record["family"]))):
                return inactive
            return Response.json({"active": True, "token_type": "refresh_token", "client_id": record["client"],
                                  "scope": record["scope"], "exp": record["exp"], "iss": self.issuer}, headers=NO_STORE)
        claims = await self._own_claims(token)
        if claims is None or await revoked_now(store, claims.get("jti"), claims["sub"], claims.get("iat")):
            return inactive
        answer = {"active": True, "token_type": "Bearer"}
        answer.update({name: claims[name] for name in ("scope", "client_id", "sub", "exp", "iat", "iss", "aud", "jti")
                       if name in claims})
        return Response.json(answer, headers=NO_STORE)

    async def _own_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid access token this endpoint issued, else None."""
        if len(token) > 16 * 1024:
            return None
        try:
            return dict((await self.verifier.identity(token)).consumer.claims)
        except Refused:
            return None


async def _form(ctx: Any) -> dict[str, str]:
    content_type = ctx.request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
    body = await ctx.read_body(MAX_FORM)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(400, "invalid_request", "the form body is malformed") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError(400, "invalid_request", "a parameter is repeated")  # RFC 6749 section 3.2
    return form


def _basic_credentials(encoded: str, realm: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError(401, "invalid_client", "malformed Basic credentials", basic_realm=realm) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError(401, "invalid_client", "malformed Basic credentials", basic_realm=realm)
    return unquote_plus(client_id), unquote_plus(secret)  # RFC 6749 section 2.3.1: form-encoded first


def _scopes(requested: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if requested is None:
        return allowed
    wanted = tuple(dict.fromkeys(requested.split()))
    if not set(wanted) <= set(allowed):
        raise OAuthError(400, "invalid_scope", "a requested scope is not allowed for this client")
    return wanted


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _refresh_key(token: str) -> str:
    return "auth:rt:" + _digest(token)


def _used_key(token: str) -> str:
    return "auth:rtu:" + _digest(token)


def _family_key(family: str) -> str:
    return "auth:rf:" + family


def _family_tokens_key(family: str) -> str:
    return "auth:rfa:" + family


async def _refresh_record(store: Store, token: str) -> dict[str, Any] | None:
    raw = await store.get(_refresh_key(token))
    return None if raw is None else json.loads(raw)
