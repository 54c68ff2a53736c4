"""What JWT authentication costs: requests/s and CPU per request through the gateway with no
plugins, and with the auth plugin checking an RS256 or an HS256 token on every request, with
and without the verified-token cache. Uses the harness of scripts/bench (loadtest/bench.py).

    scripts/install && .venv/bin/python plugins/auth/bench_auth.py [--rounds 3] [--duration 5]

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

import argparse
import http.client
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import bench  # noqa: E402  (loadtest/bench.py: the harness behind scripts/bench)

LABELS = {"d": "gateway, no plugins", "r": "auth RS256, cache on", "R": "auth RS256, cache off",
          "h": "auth HS256, cache on", "H": "auth HS256, cache off"}
TOKENS: dict[int, str] = {}  # port -> the token wrk sends there


class AuthBench(bench.Bench):
    """scripts/bench's harness, with the gateway configurations and tokens of this benchmark."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = workdir / "rs256.pub.pem"
        public.write_bytes(rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
        secret = secrets.token_urlsafe(48)
        secret_file = workdir / "hs256.secret"
        secret_file.write_text(secret)
        now = int(time.time())
        claims = {"iss": "https://idp.bench", "aud": "bench", "sub": "bench-user", "iat": now, "exp": now + 6 * 3600,
                  "jti": secrets.token_hex(8), "roles": ["reader"], "scope": "orders:read"}
        self.tokens = {"RS256": jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "k1"}),
                       "HS256": jwt.encode(claims, secret, algorithm="HS256")}
        self.keys = {"RS256": f'public_keys = [{{ file = "{public}", kid = "k1" }}]',
                     "HS256": f'hmac_keys = [{{ secret = {{ file = "{secret_file}" }} }}]'}

    def plugin_table(self, key: str) -> str:
        if key == "d":
            return ""
        algorithm = "RS256" if key in "rR" else "HS256"
        return (f"[plugins.auth]\ncache_size = {10000 if key in 'rh' else 0}\n"
                f"[[plugins.auth.issuers]]\nname = \"bench\"\nissuer = \"https://idp.bench\"\n"
                f"audience = [\"bench\"]\nalgorithms = [\"{algorithm}\"]\n{self.keys[algorithm]}\n")

    def start(self, key: str, port: int, tag: str):
        if key != "d":
            TOKENS[port] = self.tokens["RS256" if key in "rR" else "HS256"]
        admin_port = bench.free_port()
        conf = self.dir / f"gateway-{tag}.toml"
        conf.write_text(self.gateway_config(port, admin_port, False, self.args.workers) + self.plugin_table(key))
        logfile = self.dir / f"gateway-{tag}.log"
        proc = bench.spawn([str(bench.VENV_BIN / "plugway"), "run", "-c", str(conf)], logfile)
        ready = bench.wait_ready(proc, admin_port, "/ready", logfile, f"the gateway ({conf.name})")
        return proc, logfile, ready

    def check_refusal(self) -> None:
        """Without its token a request is refused (otherwise the auth configurations measure nothing)."""
        port = bench.free_port()
        proc, _, _ = self.start("r", port, "check")
        try:
            refused, _ = _plain_http_get(port)
            accepted, _ = http_get_with_token(port)
        finally:
            bench.stop(proc)
            del TOKENS[port]
        if (refused, accepted) != (401, 200):
            raise bench.BenchError(f"expected 401 without the token and 200 with it, got {refused} and {accepted}")


_plain_http_get = bench.http_get


def http_get_with_token(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    if port not in TOKENS:
        return _plain_http_get(port, path, timeout)
    conn = http.client.HTTPConnection(bench.HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKENS[port]}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wrk_with_token(port: int, seconds: float, logfile: Path) -> bench.WrkResult:
    """bench.wrk, plus the configuration's token in every request."""
    header = ["-H", f"Authorization: Bearer {TOKENS[port]}"] if port in TOKENS else []
    cmd = ["wrk", "-t1", f"-c{bench.CONNECTIONS}", f"-d{seconds:g}s", "--latency", "--timeout", "5s", *header,
           f"http://{bench.HOST}:{port}/"]
    out = logfile.with_suffix(".wrk")
    out.unlink(missing_ok=True)
    proc = bench.spawn(cmd, out)
    try:
        if not bench.wait_exit(proc, seconds + 30):
            raise bench.BenchError(f"wrk did not finish within {seconds + 30:.0f}s")
    finally:
        bench.stop(proc)
    text = out.read_text(errors="replace")
    if proc.returncode != 0:
        raise bench.BenchError(f"wrk exited with status {proc.returncode}:\n{text}")
    return bench.parse_wrk(text)


def report(configs: dict[str, bench.Config], header: dict[str, str], args: argparse.Namespace) -> str:
    lines = [f"auth benchmark: {header['date']}, nproc {header['nproc']}, {header['gateway']}",
             f"command: .venv/bin/python plugins/auth/bench_auth.py {' '.join(args.argv)}".rstrip(), ""]
    rows = [[f"{c.key}. {c.label}", bench.median_range([r.rps for r in c.runs], ",.0f"),
             bench.median_range([r.p50_ms for r in c.runs], ".2f"),
             bench.median_range([r.p99_ms for r in c.runs], ".2f"),
             bench.median_range(c.cpu_us_per_req, ".0f"), f"{max(c.foreign):.0f}", bench.errors_text(c)]
            for c in configs.values()]
    lines += bench._text_table(["config", "req/s median (min–max)", "p50 ms", "p99 ms", "CPU µs/req",
                                "foreign CPU %", "errors"], rows)
    lines.append("")
    base_cpu = statistics.median(configs["d"].cpu_us_per_req)
    for key in "rRhH":
        values = bench.ratios(configs, key, "d")
        extra = statistics.median(configs[key].cpu_us_per_req) - base_cpu
        lines.append(f"{LABELS[key]} / no plugins: {statistics.median(values):.2f}x "
                     f"({min(values):.2f}–{max(values):.2f}) over {len(values)} round(s); "
                     f"+{extra:.0f} µs of gateway CPU per request")
    lines.append(f"wrk -t1 -c{bench.CONNECTIONS} -d{args.duration:g}s after {args.warmup:g}s warm-up; "
                 f"{args.workers} worker(s); upstream: nginx, fixed 100-byte JSON body")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measured run (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded warm-up (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)

    bench.wrk, bench.http_get = wrk_with_token, http_get_with_token  # the harness sends our token
    workdir = Path(tempfile.mkdtemp(prefix="plugway-bench-auth-"))
    try:
        harness = AuthBench(args, workdir)
        configs = {key: bench.Config(key, label) for key, label in LABELS.items()}
        harness.start_upstream()
        harness.check_refusal()
        for round_no in range(1, args.rounds + 1):
            for config in configs.values():
                harness.run_once(config, round_no)
        print(report(configs, bench.machine_header(args), args), end="")
        return 0
    except bench.BenchError as error:
        bench.log(f"bench_auth: {error}")
        args.keep = True
        return 1
    except KeyboardInterrupt:
        bench.log("bench_auth: interrupted, stopping everything")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.stop_all()
        if args.keep:
            bench.log(f"(scratch directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
