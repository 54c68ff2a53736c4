"""What an RBAC decision costs, with 50 rules: alone (a timing loop over the compiled policy) and
through the gateway (the harness of scripts/bench, loadtest/variants.py).

    scripts/install && .venv/bin/python plugins/rbac/bench_rbac.py [--rounds 3] [--duration 5] [--markdown]
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
import os
import statistics
import sys
import timeit
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import variants  # noqa: E402  (loadtest/variants.py: scripts/bench's harness, for variants of the gateway)
from bench import Bench, BenchError, Config, table  # noqa: E402
from harness import http_get, http_request  # noqa: E402

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
        raise BenchError("; ".join(map(str, errors)))
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


def rbac_variants(bench: Bench) -> list[Config]:
    """i and r, with the identity stand-in written into the scratch directory; none with --isolated-only."""
    if bench.args.isolated_only:
        return []
    package = bench.dir / "rbacbench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "identity.py").write_text(IDENTITY)
    identity, env = '\n[plugins."rbacbench.identity"]\n', dict(os.environ, PYTHONPATH=str(bench.dir))
    rbac = tomli_w.dumps({"plugins": {"rbac": rbac_table()}})
    return [Config("i", "identity stand-in", toml=identity, env=env),
            Config("r", "identity + rbac, 50 rules", toml=identity + rbac, env=env)]


def check_rbac_runs(bench: Bench, configs: dict[str, Config]) -> None:
    """r really decides: GET / passes (the 50th rule), POST / has no rule and gets 403."""
    with variants.running(bench, configs["r"]) as port:
        allowed, _ = http_get(port)
        refused, body, _ = http_request(port, method="POST")
    if allowed != 200 or refused != 403 or b"no_matching_rule" not in body:
        raise BenchError(f"rbac did not decide as expected: GET {allowed}, POST {refused} {body[:200]!r}")


def report_lines(bench: Bench, configs: dict[str, Config]) -> list[str]:
    """RBAC's own CPU per request through the gateway (r - i), then the policy alone."""
    args = bench.args
    lines = []
    if "r" in configs:
        cpu = {key: statistics.median(c.cpu_us_per_req) for key, c in configs.items()}
        lines = [f"rbac per request (CPU, r - i): {cpu['r'] - cpu['i']:.1f} µs", ""]
    rows = [[label, f"{us:.2f}", result] for label, us, result in isolated(args.number)]
    return [*lines, f"alone: Policy.decide with 50 rules, best of 5 x {args.number:,} calls", "",
            *table(["case", "µs/decision", "result"], rows, args.markdown)]


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--number", type=int, default=200_000, help="decisions per timing repeat (default 200000)")
    ap.add_argument("--isolated-only", action="store_true", help="only time the policy, no gateway")


if __name__ == "__main__":
    sys.exit(variants.main(sys.argv[1:], "plugins/rbac/bench_rbac.py", __doc__, rbac_variants,
                           add_options=add_options, check=check_rbac_runs, after=report_lines))
