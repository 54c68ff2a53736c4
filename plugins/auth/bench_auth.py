"""What JWT authentication costs: requests/s and CPU per request through the gateway with no
plugins, and with the auth plugin checking an RS256 or an HS256 token on every request, with
and without the verified-token cache. Uses the harness of scripts/bench (loadtest/variants.py).

    scripts/install && .venv/bin/python plugins/auth/bench_auth.py [--rounds 3] [--duration 5] [--markdown]

It needs wrk and nginx (scripts/bench installs them). The upstream is scripts/bench's nginx
answering `GET /` with a fixed 100-byte JSON body; wrk sends one valid token (generated here,
with real keys) in `Authorization: Bearer` on every request. Each round starts each
configuration fresh, in turn, warms it up, then measures it; ratios to "no plugins" are
computed per round and their median is what to read (see loadtest/README.md on noise).

    d  the gateway, no plugins
    r  auth, RS256 token (2048-bit key), verified-token cache on (the default)
    R  auth, RS256 token, cache off (cache_size = 0): every request verifies the signature
    h  auth, HS256 token, cache on
    H  auth, HS256 token, cache off

Every auth configuration checks revocation (the default) and sends X-Consumer-ID, -Roles and
-Scopes upstream.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import variants  # noqa: E402  (loadtest/variants.py: scripts/bench's harness, for variants of the gateway)
from bench import Bench, BenchError, Config  # noqa: E402
from harness import http_get  # noqa: E402

VARIANTS = [("r", "auth RS256, cache on", "RS256", 10000), ("R", "auth RS256, cache off", "RS256", 0),
            ("h", "auth HS256, cache on", "HS256", 10000), ("H", "auth HS256, cache off", "HS256", 0)]


def auth_variants(bench: Bench) -> list[Config]:
    """r R h H, with a 2048-bit RSA key and an HMAC secret made for the run (files in the scratch
    directory), and a token signed with each."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = bench.dir / "rs256.pub.pem"
    public.write_bytes(rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    secret = secrets.token_urlsafe(48)
    secret_file = bench.dir / "hs256.secret"
    secret_file.write_text(secret)
    now = int(time.time())
    claims = {"iss": "https://idp.bench", "aud": "bench", "sub": "bench-user", "iat": now, "exp": now + 6 * 3600,
              "jti": secrets.token_hex(8), "roles": ["reader"], "scope": "orders:read"}
    tokens = {"RS256": jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "k1"}),
              "HS256": jwt.encode(claims, secret, algorithm="HS256")}
    keys = {"RS256": f'public_keys = [{{ file = "{public}", kid = "k1" }}]',
            "HS256": f'hmac_keys = [{{ secret = {{ file = "{secret_file}" }} }}]'}
    return [Config(key, label, headers=(f"Authorization: Bearer {tokens[algorithm]}",),
                   toml=f"[plugins.auth]\ncache_size = {cache_size}\n[[plugins.auth.issuers]]\nname = \"bench\"\n"
                        f"issuer = \"https://idp.bench\"\naudience = [\"bench\"]\nalgorithms = [\"{algorithm}\"]\n"
                        f"{keys[algorithm]}\n")
            for key, label, algorithm, cache_size in VARIANTS]


def check_refusal(bench: Bench, configs: dict[str, Config]) -> None:
    """Without its token a request is refused (otherwise the auth variants measure nothing)."""
    with variants.running(bench, configs["r"]) as port:
        refused, _ = http_get(port)
        accepted, _ = http_get(port, headers=configs["r"].headers)
    if (refused, accepted) != (401, 200):
        raise BenchError(f"expected 401 without the token and 200 with it, got {refused} and {accepted}")


if __name__ == "__main__":
    sys.exit(variants.main(sys.argv[1:], "plugins/auth/bench_auth.py", __doc__, auth_variants, check=check_refusal))
