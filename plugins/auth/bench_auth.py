"""What JWT authentication costs: requests/s and CPU per request through the gateway with no
plugins, and with the auth plugin checking an RS256 or an HS256 token on every request, with
and without the verified-token cache, alone and with RBAC. Uses the harness of scripts/bench
(loadtest/variants.py).

    scripts/install && .venv/bin/python plugins/auth/bench_auth.py [--rounds 3] [--duration 5] [--markdown]
    .venv/bin/python plugins/auth/bench_auth.py --isolated      # in-process timings only, no wrk or nginx

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
    b  r plus rbac: one rule, `GET /** requires orders:read`, which the token's role grants

Every auth configuration checks revocation (the default) and sends X-Consumer-ID, -Roles and
-Scopes upstream. The cost of RBAC on top of authentication is b's CPU µs per request minus r's.

--isolated times one `Policy.authenticate` call in-process instead (credential lookup, token,
revocation view over the in-process store; no HTTP, no hooks), cached and uncached, the RSA
signature check alone, and one RBAC decision of b's policy.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
import timeit
from pathlib import Path

import jwt
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import variants  # noqa: E402  (loadtest/variants.py: scripts/bench's harness, for variants of the gateway)
from bench import Bench, BenchError, Config, table  # noqa: E402
from harness import http_get, http_request  # noqa: E402

VARIANTS = [("r", "auth RS256, cache on", "RS256", 10000), ("R", "auth RS256, cache off", "RS256", 0),
            ("h", "auth HS256, cache on", "HS256", 10000), ("H", "auth HS256, cache off", "HS256", 0)]
RBAC = {"roles": {"reader": {"permissions": ["orders:read"]}},
        "rules": [{"methods": ["GET"], "path": "/**", "require": ["orders:read"]}]}


def materials(bench: Bench) -> tuple[dict[str, str], dict[str, dict]]:
    """A token per algorithm, and the issuer table that accepts it: a 2048-bit RSA key and an
    HMAC secret made for the run (public key and secret as files in the scratch directory)."""
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
    keys = {"RS256": {"public_keys": [{"file": str(public), "kid": "k1"}]},
            "HS256": {"hmac_keys": [{"secret": {"file": str(secret_file)}}]}}
    issuers = {algorithm: {"name": "bench", "issuer": "https://idp.bench", "audience": ["bench"],
                           "algorithms": [algorithm], **keys[algorithm]} for algorithm in keys}
    return tokens, issuers


def auth_table(issuer: dict, cache_size: int) -> dict:
    return {"cache_size": cache_size, "issuers": [issuer]}


def auth_variants(bench: Bench) -> list[Config]:
    """r R h H b, with the keys and tokens of materials(); none with --isolated."""
    if bench.args.isolated:
        return []
    tokens, issuers = materials(bench)
    configs = [Config(key, label, headers=(f"Authorization: Bearer {tokens[algorithm]}",),
                      toml=tomli_w.dumps({"plugins": {"auth": auth_table(issuers[algorithm], cache_size)}}))
               for key, label, algorithm, cache_size in VARIANTS]
    both = {"auth": auth_table(issuers["RS256"], 10000), "rbac": RBAC}
    configs.append(Config("b", "auth RS256, cache on, + rbac (1 rule)", headers=configs[0].headers,
                          toml=tomli_w.dumps({"plugins": both})))
    return configs


def check_refusal(bench: Bench, configs: dict[str, Config]) -> None:
    """Without its token a request is refused (otherwise the auth variants measure nothing), and
    b's rbac decides: its rule lets GET through, a POST has no rule (403)."""
    for key in ("r", "b"):
        with variants.running(bench, configs[key]) as port:
            refused, _ = http_get(port)
            accepted, _ = http_get(port, headers=configs[key].headers)
            denied, body, _ = http_request(port, method="POST", headers=configs[key].headers)
        if (refused, accepted) != (401, 200):
            raise BenchError(f"{key}: expected 401 without the token and 200 with it, got {refused} and {accepted}")
        if key == "b" and (denied != 403 or b"no_matching_rule" not in body):
            raise BenchError(f"b: rbac did not refuse a POST: {denied} {body[:200]!r}")


# --- in-process -----------------------------------------------------------------------------------


def best_us(run, number: int) -> float:
    """Best of 5 timings of ``number`` calls of ``run(number)`` (which makes them), in µs per call."""
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        run(number)
        timings.append(time.perf_counter() - started)
    return min(timings) / number * 1e6


def isolated(bench: Bench) -> list[list[str]]:
    from gateway import Consumer
    from gateway.config.schema import ConfigError, parse_settings
    from gateway.store import InProcessStore
    from plugway_auth import AuthSettings
    from plugway_auth.keys import verify
    from plugway_auth.policy import Policy, compile_issuer
    from plugway_auth.revocation import RevocationView
    from plugway_auth.tokens import parse_token
    from plugway_rbac import RbacSettings

    tokens, issuers = materials(bench)
    loop = asyncio.new_event_loop()
    revocations = RevocationView(InProcessStore(10000, 1 << 20))

    def settings(cls, table: dict, path: str):
        errors: list[ConfigError] = []
        parsed = parse_settings(cls, table, path, errors)
        if errors:
            raise BenchError("; ".join(map(str, errors)))
        return parsed

    def authenticate(algorithm: str, cache_size: int):
        auth = settings(AuthSettings, auth_table(issuers[algorithm], cache_size), "plugins.auth")
        policy = Policy(auth, issuers={issuer: compile_issuer(issuer, None) for issuer in auth.issuers},
                        revocations=revocations, store_failed=lambda *_: None, endpoint_counted=lambda *_: None)
        headers = CIMultiDict(Authorization=f"Bearer {tokens[algorithm]}")

        async def calls(number: int) -> None:
            for _ in range(number):
                await policy.authenticate(headers, "")

        loop.run_until_complete(calls(1))  # the first call verifies (and fills the cache)
        return lambda number: loop.run_until_complete(calls(number))

    args = bench.args
    rows = []
    for algorithm in ("RS256", "HS256"):
        for cache_size, label in ((10000, "cached"), (0, "uncached")):
            us = best_us(authenticate(algorithm, cache_size), args.number)
            rows.append([f"Policy.authenticate, {algorithm}, {label}", f"{us:.1f}"])
    parsed = parse_token(tokens["RS256"])
    issuer = settings(AuthSettings, auth_table(issuers["RS256"], 0), "plugins.auth").issuers[0]
    key = compile_issuer(issuer, None).keys.current.keys[0]
    signature = timeit.Timer(lambda: verify("RS256", parsed.signing_input, key, parsed.signature))
    rows.append(["RS256 signature check alone (2048-bit)", f"{timed_us(signature, args.number):.1f}"])
    policy = settings(RbacSettings, RBAC, "plugins.rbac").policy
    reader = Consumer("bench-user", roles=("reader",), scopes=("orders:read",))
    decision = timeit.Timer(lambda: policy.decide("GET", "/", reader))
    rows.append(["rbac decision, b's policy (allowed)", f"{timed_us(decision, args.number):.2f}"])
    loop.close()
    return rows


def timed_us(timer: timeit.Timer, number: int) -> float:
    return min(timer.repeat(5, number)) / number * 1e6


def report_lines(bench: Bench, configs: dict[str, Config]) -> list[str]:
    """RBAC's CPU per request on top of auth (b - r); with --isolated, the in-process timings."""
    args = bench.args
    if args.isolated:
        return [f"in-process, best of 5 x {args.number:,} calls", "",
                *table(["case", "µs/call"], isolated(bench), args.markdown)]
    if all(configs[key].cpu_us_per_req for key in ("r", "b")):
        cpu = {key: statistics.median(configs[key].cpu_us_per_req) for key in ("r", "b")}
        return [f"rbac on top of auth per request (CPU, b - r): {cpu['b'] - cpu['r']:.1f} µs"]
    return []


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--isolated", action="store_true", help="only the in-process timings, no gateway")
    ap.add_argument("--number", type=int, default=20_000, help="calls per --isolated timing repeat (default 20000)")


if __name__ == "__main__":
    sys.exit(variants.main(sys.argv[1:], "plugins/auth/bench_auth.py", __doc__, auth_variants,
                           add_options=add_options, check=check_refusal, after=report_lines))
