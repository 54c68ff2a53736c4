"""Shared fixtures of the auth plugin's tests: real keys, real signed tokens, a real JWKS
server, a recording upstream, and configurations around them.

Helpers are handed out as fixtures (``keys``, ``sign``, ``upstream``, ``jwks_server``,
``auth_config``) because several conftest.py files in one run cannot be imported by name.
"""

from __future__ import annotations

import base64
import json
import secrets
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.testing import proxy_config, route_table

ISSUER = "https://idp.example.test/"
AUDIENCE = "orders-api"


@dataclass
class KeyMaterial:
    """Keys generated for this test session; ``files`` writes PEMs and secrets into a directory."""

    rsa: Any
    rsa_other: Any
    ec256: Any
    ec384: Any
    ed25519: Any
    hmac: bytes

    def public_pem(self, key: Any) -> bytes:
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)

    def private_pem(self, key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def jwk(self, key: Any, kid: str, alg: str) -> dict:
        jwk = _public_jwk(key)
        jwk.update(kid=kid, alg=alg, use="sig")
        return jwk


def _public_jwk(key: Any) -> dict:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    return jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)


@pytest.fixture(scope="session")
def keys() -> KeyMaterial:
    return KeyMaterial(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec256=ec.generate_private_key(ec.SECP256R1()),
        ec384=ec.generate_private_key(ec.SECP384R1()),
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        hmac=secrets.token_urlsafe(48).encode(),
    )


@pytest.fixture
def key_files(keys, tmp_path) -> dict[str, Path]:
    """PEM public keys, the HMAC secret and a private signing key, as files."""
    files = {}
    for name in ("rsa", "rsa_other", "ec256", "ec384", "ed25519"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(keys.public_pem(getattr(keys, name)))
    files["hmac"] = tmp_path / "hmac.secret"
    files["hmac"].write_bytes(keys.hmac)
    files["signing"] = tmp_path / "signing.pem"
    files["signing"].write_bytes(keys.private_pem(keys.rsa_other))
    return files


class Signer:
    """Real tokens: ``sign(key, alg, **claims)``; claims default to a valid token of ``issuer`` for
    ``audience`` (a claim given as None is left out)."""

    issuer = ISSUER
    audience = AUDIENCE

    def claims(self, **overrides: Any) -> dict:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
                  "jti": secrets.token_hex(8), "roles": ["reader"], "scope": "orders:read"}
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def __call__(self, key: Any, alg: str, *, kid: str | None = "k1", headers: dict | None = None,
                 **claims: Any) -> str:
        all_headers = {"kid": kid} if kid is not None else {}
        all_headers.update(headers or {})
        return jwt.encode(self.claims(**claims), key, algorithm=alg, headers=all_headers or None)

    @staticmethod
    def raw(header: dict, claims: dict, signature: bytes = b"") -> str:
        """A token assembled by hand (for attacks PyJWT would not produce)."""
        def segment(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        return ".".join((segment(json.dumps(header).encode()), segment(json.dumps(claims).encode()),
                         segment(signature)))


@pytest.fixture
def sign() -> Signer:
    return Signer()


@pytest.fixture
def rs256_plugin(key_files):
    """``rs256_plugin(extra)``: [plugins.auth] keys plus one RS256 issuer with a PEM key (kid k1)."""

    def build(extra: str = "") -> str:
        return f"""
            {textwrap.dedent(extra).strip()}
            [[plugins.auth.issuers]]
            name = "idp"
            issuer = "{ISSUER}"
            audience = ["{AUDIENCE}"]
            algorithms = ["RS256"]
            public_keys = [{{ file = "{key_files['rsa']}", kid = "k1" }}]
        """

    return build


@dataclass
class Upstream:
    """A real upstream that records what it receives and echoes the path and headers as JSON."""

    url: str = ""
    requests: list[dict] = field(default_factory=list)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        record = {"path": request.raw_path, "headers": {name: value for name, value in request.headers.items()},
                  "raw_headers": [(n.decode(), v.decode()) for n, v in request.raw_headers]}
        self.requests.append(record)
        return web.json_response(record)


@pytest.fixture
async def upstream(aiohttp_raw_server) -> Upstream:
    recorder = Upstream()
    server = await aiohttp_raw_server(recorder.handle)
    recorder.url = str(server.make_url("")).rstrip("/")
    return recorder


@dataclass
class JwksServer:
    """A real JWKS endpoint whose keys a test can rotate; records when it answers each fetch
    (``time.monotonic()``, in ``fetched_at``)."""

    keys: list[dict] = field(default_factory=list)
    cache_control: str | None = "max-age=300"
    status: int = 200
    fetched_at: list[float] = field(default_factory=list)
    url: str = ""

    @property
    def fetches(self) -> int:
        return len(self.fetched_at)

    async def handle(self, request: web.Request) -> web.Response:
        self.fetched_at.append(time.monotonic())
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.json_response({"keys": self.keys}, status=self.status, headers=headers)


@pytest.fixture
async def jwks_server(aiohttp_server) -> JwksServer:
    served = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", served.handle)
    server = await aiohttp_server(app)
    served.url = str(server.make_url("/.well-known/jwks.json"))
    return served


@pytest.fixture
def auth_config(upstream):
    """``auth_config(plugin_toml, routes=..., server=...)``: a gateway with routes /api (auth from
    [plugins.auth]), /public (auth with anonymous allowed) and /open (no auth at all)."""

    def build(plugin: str, *, routes: str = "", server: str = "", extra: str = "") -> str:
        public_and_open = route_table("public", auth="anonymous = true") + route_table("open", auth="enabled = false")
        return proxy_config(upstream.url, server=server, routes=public_and_open + textwrap.dedent(routes),
                            plugins=f"[plugins.auth]\n{textwrap.dedent(plugin)}\n{textwrap.dedent(extra)}")

    return build
