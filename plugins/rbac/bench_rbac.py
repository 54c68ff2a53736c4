"""What an RBAC decision costs, with 50 rules: alone (a timing loop over the compiled policy) and
through the gateway (the harness of scripts/bench, loadtest/bench.py).

    scripts/install && .venv/bin/python plugins/rbac/bench_rbac.py [--rounds 3] [--duration 5]
    .venv/bin/python plugins/rbac/bench_rbac.py --isolated-only      # no wrk or nginx needed

The gateway part needs wrk and nginx (scripts/bench installs them); the upstream is scripts/bench's
nginx answering `GET /` with a fixed 100-byte body. Each round starts each configuration fresh, in
turn, warms it up, then measures it with wrk; read the medians (see loadtest/README.md on noise).

    d  the gateway, no plugins
    i  a stand-in identity plugin (sets a fixed consumer, as an auth plugin would)
    r  the same plus rbac with 50 rules, the request matching only the last one (the longest scan)

The per-request cost of RBAC is r's CPU µs per request minus i's.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import bench  # noqa: E402  (loadtest/bench.py: the harness behind scripts/bench)

from gateway import Consumer  # noqa: E402
from gateway.config.schema import ConfigError, parse_settings  # noqa: E402
from plugway_rbac import RbacSettings  # noqa: E402

RESOURCES = [f"res{n}" for n in range(12)]
ROLES = {
    "viewer": {"permissions": [f"{r}:read" for r in RESOURCES]},
    "editor": {"inherits": ["viewer"], "permissions": [f"{r}:write" for r in RESOURCES]},
    "admin": {"inherits": ["editor"], "permissions": ["*:*"]},
}


def rules_table() -> list[dict]:
    """49 rules that a GET / never matches (4 per resource, one ownership rule), then `GET /** res0:read`."""
    rules: list[dict] = []
    for resource in RESOURCES:
        rules += [
            {"methods": ["GET"], "path": f"/api/{resource}/**", "require": [f"{resource}:read"]},
            {"path": f"/api/{resource}/*/notes", "require": [f"{resource}:read"]},
            {"methods": ["POST", "PUT"], "path": f"/api/{resource}/**", "require": [f"{resource}:write"]},
            {"path": f"/api/{resource}/{{id}}/owner",
             "owner": {"param": "id", "unless": f"{resource}:write"}},
        ]
    rules.append({"path": "/api/users/{id}", "owner": {"param": "id"}})
    rules.append({"methods": ["GET"], "path": "/**", "require": ["res0:read"]})
    assert len(rules) == 50
    return rules


def rbac_table() -> dict:
    return {"roles": ROLES, "rules": rules_table()}


# --- alone ----------------------------------------------------------------------------------------


def isolated(number: int) -> list[tuple[str, float, str]]:
    """(case, best µs per decision over 5 repeats, result) for a few requests against 50 rules."""
    errors: list[ConfigError] = []
    settings = parse_settings(RbacSettings, rbac_table(), "plugins.rbac", errors)
    if errors:
        raise bench.BenchError("; ".join(map(str, errors)))
    policy = settings.policy
    viewer, owner = Consumer("u1", roles=("viewer",)), Consumer("u1")
    tried = sum(1 for rule in rules_table() if not rule.get("methods") or "GET" in rule["methods"]) - 1
    cases = [
        ("first rule (GET /api/res0/1)", "GET", "/api/res0/1", viewer),
        ("ownership rule, owner (GET /api/users/u1)", "GET", "/api/users/u1", owner),
        (f"last rule, after {tried} GET rules (GET /)", "GET", "/", viewer),
        ("no rule matches (DELETE /x): 403", "DELETE", "/x", viewer),
        ("anonymous on the last rule: 401", "GET", "/", None),
    ]
    out = []
    for label, method, path, consumer in cases:
        timer = timeit.Timer(lambda: policy.decide(method, path, consumer))
        best = min(timer.repeat(repeat=5, number=number)) / number
        out.append((label, best * 1e6, policy.decide(method, path, consumer).result))
    return out


# --- through the gateway ---------------------------------------------------------------------------

IDENTITY = '''"""Benchmark stand-in for an auth plugin: every request is the same viewer."""
from gateway import Consumer, PluginDeclaration, hookimpl

CONSUMER = Consumer("bench", roles=("viewer",))


@hookimpl
def declare_plugin():
    return PluginDeclaration(priority=1000)


@hookimpl
def on_request(ctx):
    ctx.consumer = CONSUMER
'''
LABELS = {"d": "gateway, no plugins", "i": "identity stand-in", "r": "identity + rbac, 50 rules"}


def rbac_toml() -> str:
    import tomli_w

    return tomli_w.dumps({"plugins": {"rbac": rbac_table()}})


class RbacBench(bench.Bench):
    """scripts/bench's harness, with the gateway configurations of this benchmark."""

    def start(self, key: str, port: int, tag: str):
        if key == "d":
            return super().start(key, port, tag)
        package = self.dir / "rbacbench"
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text("")
        (package / "identity.py").write_text(IDENTITY)
        admin_port = bench.free_port()
        conf = self.dir / f"gateway-{tag}.toml"
        text = self.gateway_config(port, admin_port, False) + '\n[plugins."rbacbench.identity"]\n'
        conf.write_text(text + (rbac_toml() if key == "r" else ""))
        logfile = self.dir / f"gateway-{tag}.log"
        env = dict(os.environ, PYTHONPATH=str(self.dir))
        proc = bench.spawn([str(bench.VENV_BIN / "plugway"), "run", "-c", str(conf)], logfile, env=env)
        ready = bench.wait_ready(proc, admin_port, "/ready", logfile, f"the gateway ({conf.name})")
        return proc, logfile, ready

    def check_rbac_runs(self) -> None:
        """r really decides: GET / passes (the 50th rule), POST / has no rule and gets 403."""
        port = bench.free_port()
        proc, _, _ = self.start("r", port, "check")
        try:
            allowed, _ = bench.http_get(port)
            conn = http.client.HTTPConnection(bench.HOST, port, timeout=2)
            conn.request("POST", "/", body=b"")
            response = conn.getresponse()
            refused, body = response.status, response.read()
            conn.close()
        finally:
            bench.stop(proc)
        if allowed != 200 or refused != 403 or b"no_matching_rule" not in body:
            raise bench.BenchError(f"rbac did not decide as expected: GET {allowed}, POST {refused} {body[:200]!r}")


def report(isolated_rows, configs, header, args) -> str:
    lines = [f"rbac benchmark: {header['date']}, nproc {header['nproc']}, {header['gateway']}",
             f"command: .venv/bin/python plugins/rbac/bench_rbac.py {' '.join(args.argv)}".rstrip(), "",
             f"alone: Policy.decide with 50 rules, best of 5 x {args.number:,} calls"]
    lines += bench._text_table(["case", "µs/decision", "result"],
                               [[label, f"{us:.2f}", result] for label, us, result in isolated_rows])
    if not configs:
        return "\n".join(lines) + "\n"
    lines.append("")
    rows = [[f"{c.key}. {c.label}", bench.median_range([r.rps for r in c.runs], ",.0f"),
             bench.median_range([r.p50_ms for r in c.runs], ".2f"),
             bench.median_range([r.p99_ms for r in c.runs], ".2f"),
             bench.median_range(c.cpu_us_per_req, ".0f"), f"{max(c.foreign):.0f}", bench.errors_text(c)]
            for c in configs.values()]
    lines += bench._text_table(["config", "req/s median (min–max)", "p50 ms", "p99 ms", "CPU µs/req",
                                "foreign CPU %", "errors"], rows)
    lines.append("")
    cpu = {key: statistics.median(c.cpu_us_per_req) for key, c in configs.items()}
    lines.append(f"rbac per request (CPU, r - i): {cpu['r'] - cpu['i']:.1f} µs; "
                 f"identity stand-in (i - d): {cpu['i'] - cpu['d']:.1f} µs")
    values = bench.ratios(configs, "r", "d")
    lines.append(f"{LABELS['r']} / no plugins: {statistics.median(values):.2f}x req/s "
                 f"({min(values):.2f}–{max(values):.2f}) over {len(values)} round(s)")
    lines.append(f"wrk -t1 -c{bench.CONNECTIONS} -d{args.duration:g}s after {args.warmup:g}s warm-up; "
                 f"{args.workers} worker(s); upstream: nginx, fixed 100-byte body")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measured run (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded warm-up (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    parser.add_argument("--number", type=int, default=200_000, help="decisions per timing repeat (default 200000)")
    parser.add_argument("--isolated-only", action="store_true", help="only time the policy, no gateway")
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

    workdir = Path(tempfile.mkdtemp(prefix="plugway-bench-rbac-"))
    try:
        rows = isolated(args.number)
        configs: dict[str, bench.Config] = {}
        if not args.isolated_only:
            harness = RbacBench(args, workdir)
            configs = {key: bench.Config(key, label) for key, label in LABELS.items()}
            harness.start_upstream()
            harness.check_rbac_runs()
            for round_no in range(1, args.rounds + 1):
                for config in configs.values():
                    harness.run_once(config, round_no)
        print(report(rows, configs, bench.machine_header(args), args), end="")
        return 0
    except bench.BenchError as error:
        bench.log(f"bench_rbac: {error}")
        args.keep = True
        return 1
    except KeyboardInterrupt:
        bench.log("bench_rbac: interrupted, stopping everything")
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
