"""Verification and signing keys: which key fits which algorithm, loaded from PEM, secrets or JWKs.

A key knows its kind (HMAC secret, RSA, an EC curve, Ed25519/Ed448), so a token can only be
checked with a key of the kind its algorithm needs: an RSA public key is never an HMAC
secret, whatever the token's header says. Signatures are computed and checked by PyJWT's
algorithm implementations (over ``cryptography``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.exceptions import PyJWTError

ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 section 3.2: at least the hash size
SIGNING_ALGORITHMS = ("RS256", "ES256")  # what the token endpoint signs with
MIN_RSA_BITS = 2048
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_JWK_CURVES = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}
_IMPLEMENTATIONS = get_default_algorithms()


def kind_for(algorithm: str) -> str:
    """The kind of key an algorithm needs: hmac, rsa, ec:<curve> or okp."""
    if algorithm.startswith("HS"):
        return "hmac"
    if algorithm[:2] in ("RS", "PS"):
        return "rsa"
    if algorithm in _EC_CURVES:
        return "ec:" + _EC_CURVES[algorithm]
    return "okp"


def kind_of(key: Any) -> str:
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return "rsa"
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return "ec:" + key.curve.name
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey, ed25519.Ed25519PrivateKey,
                        ed448.Ed448PrivateKey)):
        return "okp"
    raise ValueError(f"unsupported key type {type(key).__name__}")


@dataclass(frozen=True)
class VerificationKey:
    """One key an issuer signs with. ``kid`` None matches any token; ``algorithm`` None any of its kind."""

    key: Any
    kind: str
    kid: str | None = None
    algorithm: str | None = None

    def fits(self, algorithm: str) -> bool:
        return self.kind == kind_for(algorithm) and (self.algorithm is None or self.algorithm == algorithm)


def verify(algorithm: str, signing_input: bytes, key: VerificationKey, signature: bytes) -> bool:
    return _IMPLEMENTATIONS[algorithm].verify(signing_input, key.key, signature)


class KeySet:
    """An issuer's keys, looked up by the token's ``alg`` and ``kid``."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self.keys = tuple(keys)
        self._by_kid: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                self._by_kid.setdefault(key.kid, []).append(key)
        self._without_kid = [key for key in self.keys if key.kid is None]

    def candidates(self, algorithm: str, kid: str | None) -> list[VerificationKey]:
        """Keys that may have signed a token: the kid's, plus keys without a kid (all fitting keys if no kid)."""
        pool = self.keys if kid is None else self._by_kid.get(kid, []) + self._without_kid
        return [key for key in pool if key.fits(algorithm)]

    def knows(self, kid: str) -> bool:
        return kid in self._by_kid

    def __len__(self) -> int:
        return len(self.keys)


# --- loading ---------------------------------------------------------------------------------------


def public_key_from_pem(data: bytes) -> Any:
    """A public key from a PEM public key (SubjectPublicKeyInfo) or an X.509 certificate."""
    if b"-----BEGIN CERTIFICATE-----" in data:
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    _check_strength(key)
    return key


def private_key_from_pem(data: bytes) -> Any:
    key = serialization.load_pem_private_key(data, password=None)
    _check_strength(key)
    return key


def _check_strength(key: Any) -> None:
    kind = kind_of(key)
    if kind == "rsa" and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits, not {key.key_size}")


def key_from_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """A verification key from one JWK of a JWKS document; ValueError for what must be skipped."""
    if not isinstance(jwk, Mapping):
        raise ValueError("not a JSON object")
    kty, kid, alg = jwk.get("kty"), jwk.get("kid"), jwk.get("alg")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("not a signing key")
    if "d" in jwk:
        raise ValueError("a private key in a JWKS document")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if alg is not None and alg not in ALGORITHMS:
        raise ValueError(f"unsupported alg {alg!r}")
    implementation = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}.get(kty)
    if implementation is None:
        raise ValueError(f"unsupported key type {kty!r}")  # "oct" included: secrets are never published
    if kty == "EC" and jwk.get("crv") not in _JWK_CURVES:
        raise ValueError(f"unsupported curve {jwk.get('crv')!r}")
    try:
        key = implementation.from_jwk(dict(jwk))
    except (PyJWTError, TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"invalid {kty} key: {exc}") from None
    _check_strength(key)
    verification = VerificationKey(key, kind_of(key), kid, alg)
    if alg is not None and not verification.fits(alg):
        raise ValueError(f"the key does not fit its alg {alg}")
    return verification


def public_jwk(private_key: Any, kid: str, algorithm: str) -> dict[str, Any]:
    """The public half of a signing key as a JWK, for /.well-known/jwks.json."""
    implementation = RSAAlgorithm if kind_of(private_key) == "rsa" else ECAlgorithm
    jwk = implementation.to_jwk(private_key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg=algorithm, use="sig")
    return jwk
