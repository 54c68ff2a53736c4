"""Requests per second over TLS against plain HTTP, next to nginx with the same certificate (issue 12).

    .venv/bin/python loadtest/tls_bench.py [--rounds 3] [--duration 5] [--warmup 2] [--key ec|rsa] [--keep]

The fast upstream of scripts/bench (loadtest/nginx/upstream.conf, started once) and a certificate
made for the run: a CA and a server certificate it signs (SAN 127.0.0.1 and localhost), the same
files for nginx and the gateway. Four targets, each measured in two modes:

    nginx, plain      loadtest/nginx/proxy.conf, 1 worker (config b of scripts/bench)
    nginx, TLS        loadtest/nginx/proxy-tls.conf: the same proxy terminating TLS
    gateway, plain    no plugins, workers = 2, [log] access = false (config d of scripts/bench)
    gateway, TLS      the same with a TLS listener (TLS settings: the gateway's defaults)

    keep-alive        wrk -t1 -c64: 64 connections, each reused for every request
    new connection    the same with -H "Connection: close": the server closes after every
                      response, so wrk opens one TCP connection, and over TLS makes one handshake,
                      per request. wrk keeps each connection's last TLS session and offers it on
                      the next connect, so a handshake is a resumption whenever the server accepts
                      the session (the probe below says how often it does).

Every (target, mode) run starts the target fresh, checks that GET / answers 200 with the
upstream's 100 bytes (over https with the certificate verified against the run's CA), warms up with
wrk (discarded), measures with wrk, and stops the target; rounds are round-robin. After each TLS
run, a probe makes 40 sequential connections, each offering the previous one's session, and counts
how many the server resumed.

Everything listens on and sends to 127.0.0.1; every process runs in its own process group and is
stopped when the run ends, fails or is interrupted. Progress goes to stderr, the Markdown section
for loadtest/RESULTS.md to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import os
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import (
    HOST, BenchError, all_ticks, cpu_ticks, foreign_cpu, free_port, http_get, log, process_tree, run_in_scratch,
    stop, wait_ready,
)
from bench import (
    FOREIGN_WARN, Bench, WrkResult, _md_table, errors_text, machine_header, markdown_head, median_range, ratio_text,
    rotated, wrk,
)

GATEWAY_WORKERS = 2
PROBE_CONNECTIONS = 40
UPSTREAM_BODY = 100  # bytes of the upstream's answer
MODES = {"keep-alive": (), "new connection": ("Connection: close",)}


# -- certificates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA certificate clients verify against
    cert: Path  # the server certificate (served by nginx and the gateway)
    key: Path
    description: str


def new_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=not ca,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def make_certificates(directory: Path, kind: str) -> Certificates:
    """A CA and a server certificate for 127.0.0.1 and localhost that it signs, as PEM files."""
    directory.mkdir(mode=0o700, exist_ok=True)
    ca_key = new_key(kind)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plugway tls_bench CA")])
    ca_cert = (_builder("Plugway tls_bench CA", ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(ca=True), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = new_key(kind)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (_builder("localhost", ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                         "RSA 2048" if kind == "rsa" else "ECDSA P-256")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.touch(mode=0o600)
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return paths


# -- TLS clients -------------------------------------------------------------------------------

def client_context(ca: Path) -> ssl.SSLContext:
    """Verifies the server's certificate against the run's CA, and its name (127.0.0.1)."""
    return ssl.create_default_context(cafile=str(ca))


def https_get(port: int, path: str = "/", timeout: float = 2.0, *,
              context: ssl.SSLContext) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(HOST, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Handshake:
    version: str
    cipher: str
    resumed: bool
    session: ssl.SSLSession | None


def _exchange(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> Handshake:
    """One Connection: close request on a new TLS connection that offers session."""
    with socket.create_connection((HOST, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=HOST, session=session) as conn:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            while conn.recv(65536):
                pass  # reading to the end also takes in the TLS 1.3 session tickets
            return Handshake(conn.version(), conn.cipher()[0], conn.session_reused, conn.session)


def handshake_summary(port: int, context: ssl.SSLContext) -> str:
    handshake = _exchange(port, context, None)
    return f"{handshake.version} {handshake.cipher}"


def resumed_sessions(port: int, context: ssl.SSLContext, attempts: int = PROBE_CONNECTIONS) -> int:
    """How many of `attempts` sequential connections, each offering the session of the previous
    one (as wrk does on each of its connections), the server resumed."""
    session, resumed = None, 0
    for _ in range(attempts):
        handshake = _exchange(port, context, session)
        resumed += handshake.resumed
        session = handshake.session
    return resumed


# -- targets and results -----------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    server: str  # "nginx" or "gateway"
    tls: bool

    @property
    def name(self) -> str:
        return f"{self.server}-{'tls' if self.tls else 'plain'}"

    @property
    def label(self) -> str:
        return f"{self.server}, {'TLS' if self.tls else 'plain'}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


TARGETS = [Target("nginx", False), Target("nginx", True), Target("gateway", False), Target("gateway", True)]


@dataclass
class Series:
    """The runs of one target in one mode, one per round."""
    target: Target
    mode: str
    runs: list[WrkResult] = field(default_factory=list)
    cpu_us_per_req: list[float] = field(default_factory=list)  # the target's process tree
    wrk_cpu: list[float] = field(default_factory=list)  # % of one core used by wrk
    procs: list[int] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)  # % of one core used by processes not ours


@dataclass
class Measured:
    result: WrkResult
    cpu_us_per_req: float
    wrk_cpu: float
    procs: int
    foreign: float
    busiest: str


class TlsBench(Bench):
    """scripts/bench's upstream, nginx and gateway starters, with TLS where the target asks for it."""

    def __init__(self, args: argparse.Namespace, workdir: Path, certs: Certificates) -> None:
        super().__init__(args, workdir)
        self.certs = certs
        self.client = client_context(certs.ca)
        self.serve_tls = False  # whether gateway_config gives the gateway's listener TLS
        self.resumed: dict[str, list[int]] = {}  # target name -> resumed sessions per probe
        self.handshakes: dict[str, str] = {}  # target name -> TLS version and cipher negotiated

    def gateway_config(self, port: int, admin_port: int, *args: Any, **kwargs: Any) -> str:
        text = super().gateway_config(port, admin_port, *args, **kwargs)
        return tls_listener(text, port, self.certs) if self.serve_tls else text

    def get(self, target: Target):
        if not target.tls:
            return http_get
        return lambda port, path="/", timeout=2.0: https_get(port, path, timeout, context=self.client)

    def start_target(self, target: Target, port: int, tag: str) -> subprocess.Popen:
        if target.server == "gateway":
            self.serve_tls = target.tls
            proc, _ = self.start_gateway(port, False, GATEWAY_WORKERS, tag)
            return proc
        name = "proxy-tls" if target.tls else "proxy"
        proc = self.start_nginx(name, port)
        wait_ready(proc, port, "/", self.dir / f"{name}.log", f"nginx ({name}.conf)", get=self.get(target))
        return proc

    def check(self, target: Target, port: int) -> None:
        """GET / answers 200 with the upstream's body (over https: certificate verified)."""
        try:
            status, body = self.get(target)(port)
        except (OSError, ssl.SSLError) as error:
            raise BenchError(f"{target.label}: GET / failed: {error}") from None
        if status != 200 or len(body) != UPSTREAM_BODY:
            raise BenchError(f"{target.label}: GET / answered {status} with {len(body)} bytes")
        if target.tls and target.name not in self.handshakes:
            self.handshakes[target.name] = handshake_summary(port, self.client)

    def run_once(self, series: Series, round_no: int) -> None:
        target, headers = series.target, MODES[series.mode]
        tag = f"{target.name}-{series.mode.replace(' ', '-')}-{round_no}"
        port = free_port()
        proc = self.start_target(target, port, tag)
        try:
            self.check(target, port)
            if self.args.warmup:  # wrk refuses -d0s
                wrk(port, self.args.warmup, self.dir / f"{tag}-warmup.log", scheme=target.scheme,
                    headers=headers)
            measured = self.measure(proc, target, port, headers, tag)
            if target.tls:
                self.resumed.setdefault(target.name, []).append(resumed_sessions(port, self.client))
        finally:
            stop(proc)
        record(series, measured)
        log_run(series, round_no, measured, self.resumed.get(target.name) if target.tls else None)

    def measure(self, proc: subprocess.Popen, target: Target, port: int, headers: tuple[str, ...],
                tag: str) -> Measured:
        tree = process_tree(proc.pid)
        before, machine_before, children_before = cpu_ticks(proc.pid), all_ticks(), os.times()
        started = time.monotonic()
        result = wrk(port, self.args.duration, self.dir / f"{tag}.log", scheme=target.scheme, headers=headers)
        ticks = cpu_ticks(proc.pid) - before
        foreign, busiest = foreign_cpu(machine_before, time.monotonic() - started)
        children = os.times()  # wrk has been reaped: its CPU time is in our children's
        wrk_seconds = (children.children_user - children_before.children_user
                       + children.children_system - children_before.children_system)
        cpu_us = ticks / os.sysconf("SC_CLK_TCK") / result.requests * 1e6 if result.requests else 0.0
        return Measured(result, cpu_us, 100.0 * wrk_seconds / self.args.duration, len(tree), foreign, busiest)


def tls_listener(config: str, port: int, certs: Certificates) -> str:
    """The gateway configuration with its plain listener replaced by a TLS one on the same port."""
    plain = f'listen = ["{HOST}:{port}"]'
    if plain not in config:
        raise BenchError(f"no {plain!r} line in the gateway configuration to give TLS")
    tls = (f'listen = [{{ address = "{HOST}:{port}", tls = {{ certificates = '
           f'[{{ cert = "{certs.cert}", key = "{certs.key}" }}] }} }}]')
    return config.replace(plain, tls, 1)


def record(series: Series, measured: Measured) -> None:
    series.runs.append(measured.result)
    series.cpu_us_per_req.append(measured.cpu_us_per_req)
    series.wrk_cpu.append(measured.wrk_cpu)
    series.procs.append(measured.procs)
    series.foreign.append(measured.foreign)


def log_run(series: Series, round_no: int, measured: Measured, resumed: list[int] | None) -> None:
    result = measured.result
    errors = f", errors: {result.socket_errors} socket, {result.non2xx} non-2xx/3xx" \
        if result.socket_errors or result.non2xx else ""
    probe = f", resumed {resumed[-1]}/{PROBE_CONNECTIONS}" if resumed else ""
    log(f"  round {round_no} {series.target.label}, {series.mode}: {result.rps:,.0f} req/s, "
        f"p99 {result.p99_ms:.2f} ms, {measured.cpu_us_per_req:.0f} µs CPU/req, wrk {measured.wrk_cpu:.0f}% "
        f"of a core, foreign CPU {measured.foreign:.0f}%{probe}{errors}")
    if measured.foreign > FOREIGN_WARN:
        log(f"  warning: processes this run did not start used {measured.foreign:.0f}% of a core "
            f"({measured.busiest}): the numbers are unreliable")


# -- report ------------------------------------------------------------------------------------

def round_ratios(top: Series, bottom: Series) -> list[float]:
    return [a.rps / b.rps for a, b in zip(top.runs, bottom.runs) if b.rps]


def results_table(all_series: dict[tuple[str, str], Series]) -> list[str]:
    titles = ["target", "mode", "req/s median (min–max)", "p99 ms", "CPU µs/req", "wrk CPU %", "procs",
              "foreign CPU % (max)", "errors"]
    rows = [[s.target.label, s.mode, median_range([r.rps for r in s.runs], ",.0f"),
             median_range([r.p99_ms for r in s.runs], ".2f"), median_range(s.cpu_us_per_req, ".0f"),
             median_range(s.wrk_cpu, ".0f"), "/".join(map(str, sorted(set(s.procs)))),
             f"{max(s.foreign):.0f}", errors_text(s)] for s in all_series.values()]
    return _md_table(titles, rows)


def ratio_table(all_series: dict[tuple[str, str], Series]) -> list[str]:
    pairs = [("nginx: TLS / plain", "nginx-tls", "nginx-plain"),
             ("gateway: TLS / plain", "gateway-tls", "gateway-plain"),
             ("plain: gateway / nginx", "gateway-plain", "nginx-plain"),
             ("TLS: gateway / nginx", "gateway-tls", "nginx-tls")]
    rows = [[title] + [ratio_text(round_ratios(all_series[top, mode], all_series[bottom, mode])) for mode in MODES]
            for title, top, bottom in pairs]
    return _md_table(["req/s ratio, per round: median (min–max)"] + list(MODES), rows)


def tls_cpu_table(all_series: dict[tuple[str, str], Series]) -> list[str]:
    """CPU µs per request that TLS adds, from the medians."""
    def extra(server: str, mode: str) -> str:
        tls = statistics.median(all_series[f"{server}-tls", mode].cpu_us_per_req)
        plain = statistics.median(all_series[f"{server}-plain", mode].cpu_us_per_req)
        return f"{tls - plain:+.0f} ({tls / plain:.2f}x)" if plain else f"{tls - plain:+.0f}"
    rows = [[server] + [extra(server, mode) for mode in MODES] for server in ("nginx", "gateway")]
    return _md_table(["CPU µs/req, TLS − plain (TLS/plain)"] + list(MODES), rows)


def resumption_text(bench: TlsBench) -> str:
    parts = []
    for name, counts in bench.resumed.items():
        low, high = min(counts), max(counts)
        parts.append(f"{name} {low}{'' if low == high else f'–{high}'}/{PROBE_CONNECTIONS}")
    return ", ".join(parts)


def report(bench: TlsBench, all_series: dict[tuple[str, str], Series], header: dict[str, str]) -> str:
    args = bench.args
    handshakes = ", ".join(f"{name} {summary}" for name, summary in bench.handshakes.items())
    notes = [
        f"certificate: {bench.certs.description}, signed by a CA made for the run (SAN 127.0.0.1, localhost); "
        f"the same files for nginx and the gateway. Negotiated by Python's client: {handshakes}.",
        f"{args.rounds} round(s), round-robin, each round begun one series further; each run: fresh start, "
        "GET / checked (200, 100 bytes; over https verified against the run's CA), "
        f"{args.warmup:g} s wrk warm-up (discarded), "
        f"`wrk -t1 -c64 -d{args.duration:g}s --latency --timeout 5s`, plus `-H \"Connection: close\"` for "
        "new connection.",
        "nginx: 1 worker, upstream keep-alive (proxy.conf, proxy-tls.conf). Gateway: no plugins, "
        f"workers = {GATEWAY_WORKERS}, [log] access = false. Upstream: nginx, 1 worker, fixed 100-byte body.",
        "New connection: wrk offers each connection's last TLS session again, so handshakes are resumptions "
        "when the server accepts them. Resumption probe after each TLS run (40 sequential connections, each "
        f"offering the previous one's session; min–max over runs): {resumption_text(bench)}.",
        "p99: median over rounds of wrk's 99th percentile, which counts from sending the request: the TCP "
        "connect and TLS handshake are not in it. CPU µs/req: CPU time of the target's process tree per "
        "request: the steadiest figure. wrk CPU %: wrk's CPU time during the measured run, in % of one core. "
        "In new-connection TLS runs it includes busy polling: while a handshake waits for the server, wrk's "
        "socket stays registered for writability and SSL_connect returns WANT_READ at once, so wrk spins, "
        "the more the slower the server answers; on 2 cores that CPU is taken from the server. foreign CPU: "
        "processes this run did not start, % of one core, the largest run "
        f"(above {FOREIGN_WARN:.0f}% the machine was busy). Ratios are computed per round.",
    ]
    out = markdown_head(header, "TLS against plain HTTP (tls_bench.py)") + [f"- {note}" for note in notes] + [""]
    out += results_table(all_series) + [""] + ratio_table(all_series) + [""] + tls_cpu_table(all_series)
    return "\n".join(out) + "\n"


def header_for(args: argparse.Namespace) -> dict[str, str]:
    header = machine_header(args)
    header["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header["command"] = ".venv/bin/python loadtest/tls_bench.py" + (" " + shlex.join(args.argv) if args.argv else "")
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    header["versions"] += f", {ssl.OPENSSL_VERSION} (Python), gateway event loop {loop}"
    return header


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="loadtest/tls_bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every run (default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each measured wrk run (default 5)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded warm-up (default 2)")
    ap.add_argument("--key", choices=("ec", "rsa"), default="ec",
                    help="server key: ec (ECDSA P-256, default) or rsa (RSA 2048)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, certificates)")
    args = ap.parse_args(argv)
    for name, low, high in (("rounds", 1, 20), ("duration", 1, 60), ("warmup", 0, 30)):
        if not low <= getattr(args, name) <= high:
            ap.error(f"--{name} must be between {low} and {high}")
    args.argv = argv
    args.workers = GATEWAY_WORKERS  # read by Bench
    return args


def run_rounds(bench: TlsBench) -> dict[tuple[str, str], Series]:
    all_series = {(t.name, mode): Series(t, mode) for mode in MODES for t in TARGETS}
    for round_no in range(1, bench.args.rounds + 1):
        for series in rotated(list(all_series.values()), round_no):
            bench.run_once(series, round_no)
    return all_series


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    header = header_for(args)

    def measure(workdir: Path) -> str:
        bench = TlsBench(args, workdir, make_certificates(workdir / "tls", args.key))
        runs = len(TARGETS) * len(MODES) * args.rounds
        log(f"scratch directory: {workdir}; {runs} runs of about {args.warmup + args.duration + 1:g} s")
        bench.start_upstream()
        return report(bench, run_rounds(bench), header)
    return run_in_scratch("tls_bench", "plugway-tls-bench-", args.keep, measure)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
