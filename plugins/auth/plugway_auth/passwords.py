"""Client secrets of the token endpoint, stored as salted scrypt hashes.

Unlike API keys, a client secret may have been chosen by a person, so it gets a slow,
salted hash (scrypt, n=2**14, r=8, p=1: about 40 ms and 16 MiB per check). Checks run in a
thread so the event loop never waits on them; the endpoint is meant to sit behind a rate
limit (see the README). Written as ``scrypt$N$R$P$SALT$HASH`` (base64url, no padding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

N, R, P = 2**14, 8, 1
PREFIX = "pwc_"
_FORMAT = "scrypt$N$R$P$SALT$HASH, as printed by `plugway oauth-client new`"


@dataclass(frozen=True)
class SecretHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        return f"scrypt${self.n}${self.r}${self.p}${_b64(self.salt)}${_b64(self.digest)}"


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> SecretHash:
    salt = os.urandom(16)
    return SecretHash(N, R, P, salt, _scrypt(secret, salt, N, R, P))


def parse_secret_hash(text: object) -> SecretHash:
    parts = text.split("$") if isinstance(text, str) else []
    if len(parts) != 6 or parts[0] != "scrypt" or not all(part.isdigit() for part in parts[1:4]):
        raise ValueError(f"must be {_FORMAT}")
    n, r, p = (int(part) for part in parts[1:4])
    if n < 2**10 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range (n a power of two from 2**10 to 2**20, r 1-32, p 1-16)")
    try:
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise ValueError(f"must be {_FORMAT}") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("the salt or the hash is too short")
    return SecretHash(n, r, p, salt, digest)


def verify_secret(secret: str, stored: SecretHash) -> bool:
    """Slow on purpose; call it in a thread."""
    computed = _scrypt(secret, stored.salt, stored.n, stored.r, stored.p, len(stored.digest))
    return hmac.compare_digest(computed, stored.digest)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, length: int = 32) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=256 * 1024 * 1024)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
