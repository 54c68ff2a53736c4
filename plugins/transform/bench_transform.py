"""What a transform rule costs: requests/s through the gateway with no plugins, with one header
rule, and with one JSON body rule, measured by the harness of scripts/bench (loadtest/bench.py).

    scripts/install && .venv/bin/python plugins/transform/bench_transform.py [--rounds 3] [--duration 5]

It needs wrk and nginx (scripts/bench installs them). The upstream is scripts/bench's nginx
answering `GET /` with a fixed 100-byte JSON body. Each round starts each configuration fresh,
in turn (round-robin), warms it up, then measures it with wrk; the ratios to "no plugins" are
computed per round, and their median is what to read (see loadtest/README.md on noise).

    d  the gateway, no plugins
    h  transform with one request header rule: set_headers = { X-Client = "{header.User-Agent}" }
    j  transform with one response JSON body rule: rename_body = { service = "name" }
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import bench  # noqa: E402  (loadtest/bench.py: the harness behind scripts/bench)

RULES = {
    "h": '[plugins.transform]\n[[plugins.transform.request]]\nset_headers = { X-Client = "{header.User-Agent}" }\n',
    "j": '[plugins.transform]\n[[plugins.transform.response]]\nrename_body = { service = "name" }\n',
}
LABELS = {"d": "gateway, no plugins", "h": "transform, 1 header rule", "j": "transform, 1 JSON body rule"}


class TransformBench(bench.Bench):
    """scripts/bench's harness, with the gateway configurations of this benchmark."""

    def start(self, key: str, port: int, tag: str):
        if key == "d":
            return super().start(key, port, tag)
        admin_port = bench.free_port()
        conf = self.dir / f"gateway-{tag}.toml"
        conf.write_text(self.gateway_config(port, admin_port, False) + RULES[key])
        logfile = self.dir / f"gateway-{tag}.log"
        proc = bench.spawn([str(bench.VENV_BIN / "plugway"), "run", "-c", str(conf)], logfile)
        ready = bench.wait_ready(proc, admin_port, "/ready", logfile, f"the gateway ({conf.name})")
        return proc, logfile, ready

    def check_body_rule(self) -> None:
        """The JSON rule really rewrites the upstream's body (otherwise j would measure nothing)."""
        port = bench.free_port()
        proc, _, _ = self.start("j", port, "check")
        try:
            status, body = bench.http_get(port)
        finally:
            bench.stop(proc)
        if status != 200 or b'"name":"upstream"' not in body:
            raise bench.BenchError(f"the JSON body rule did not apply: {status} {body[:200]!r}")


def report(configs: dict[str, bench.Config], header: dict[str, str], args: argparse.Namespace) -> str:
    lines = [f"transform benchmark: {header['date']}, nproc {header['nproc']}, {header['gateway']}",
             f"command: .venv/bin/python plugins/transform/bench_transform.py {' '.join(args.argv)}".rstrip(), ""]
    rows = [[f"{c.key}. {c.label}", bench.median_range([r.rps for r in c.runs], ",.0f"),
             bench.median_range([r.p50_ms for r in c.runs], ".2f"),
             bench.median_range([r.p99_ms for r in c.runs], ".2f"),
             bench.median_range(c.cpu_us_per_req, ".0f"), f"{max(c.foreign):.0f}", bench.errors_text(c)]
            for c in configs.values()]
    lines += bench._text_table(["config", "req/s median (min–max)", "p50 ms", "p99 ms", "CPU µs/req",
                                "foreign CPU %", "errors"], rows)
    lines.append("")
    for key in "hj":
        values = bench.ratios(configs, key, "d")
        lines.append(f"{LABELS[key]} / no plugins: {statistics.median(values):.2f}x "
                     f"({min(values):.2f}–{max(values):.2f}) over {len(values)} round(s)")
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

    workdir = Path(tempfile.mkdtemp(prefix="plugway-bench-transform-"))
    try:
        harness = TransformBench(args, workdir)
        configs = {key: bench.Config(key, label) for key, label in LABELS.items()}
        harness.start_upstream()
        harness.check_body_rule()
        for round_no in range(1, args.rounds + 1):
            for config in configs.values():
                harness.run_once(config, round_no)
        print(report(configs, bench.machine_header(args), args), end="")
        return 0
    except bench.BenchError as error:
        bench.log(f"bench_transform: {error}")
        args.keep = True
        return 1
    except KeyboardInterrupt:
        bench.log("bench_transform: interrupted, stopping everything")
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
