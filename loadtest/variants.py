"""Variants of the gateway, each measured against the gateway with no plugins: the harness of the
plugin benchmarks (plugins/*/bench_*.py), which is scripts/bench's (bench.py).

A variant is a bench.Config with `toml` set: TOML appended to the configuration of scripts/bench's
config d (the gateway, no plugins, --workers workers, [log] access = false, the nginx upstream),
and optionally `server`, lines for d's [server] table, `headers` that wrk (and the GET that checks
each run) sends and `env` for the gateway. main() takes scripts/bench's options (--rounds,
--duration, --warmup, --workers, --markdown, --keep) and a script's own, runs d and the variants
round-robin (each round begun one variant further), each run started
fresh, warmed up, measured with wrk and stopped as scripts/bench does, and prints one table:
req/s median (min–max), CPU µs/req, its difference to d, the per-round req/s ratio to d
(median, min–max), foreign CPU and errors, as text or Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

from bench import (
    FOREIGN_WARN, Bench, Config, machine_header, markdown_head, options, parse, plugin_cost_rows, rotated, rounds_note,
    table, text_head,
)
from harness import free_port, run_in_scratch, stop


def main(argv: list[str], prog: str, doc: str | None, variants: Callable[[Bench], list[Config]], *,
         add_options: Callable[[argparse.ArgumentParser], None] | None = None,
         check: Callable[[Bench, dict[str, Config]], None] | None = None,
         after: Callable[[Bench, dict[str, Config]], list[str]] | None = None) -> int:
    """Benchmark prog (its path from the repository's root) with argv. variants(bench) makes the
    variants (it may write files into bench.dir; none: nothing is run); check(bench, configs), when
    given, runs before the rounds and raises BenchError if a variant would measure nothing;
    after(bench, configs), after them, returns lines for the end of the report."""
    ap = options(prog, doc)
    if add_options:
        add_options(ap)
    args = parse(ap, argv)
    header = machine_header(args)
    header["command"] = f".venv/bin/python {prog}" + (f" {shlex.join(argv)}" if argv else "")
    name = Path(prog).stem

    def measure(workdir: Path) -> str:
        bench = Bench(args, workdir)
        configs = {"d": Config("d", "gateway, no plugins", toml="")}
        configs.update((config.key, config) for config in variants(bench))
        if len(configs) > 1:
            bench.start_upstream()
            if check:
                check(bench, configs)
            for round_no in range(1, args.rounds + 1):
                for config in rotated(list(configs.values()), round_no):
                    bench.run_once(config, round_no)
        return report(bench, configs, header, Path(prog).name, after(bench, configs) if after else [])
    return run_in_scratch(name, f"plugway-{name.replace('_', '-')}-", args.keep, measure)


@contextlib.contextmanager
def running(bench: Bench, config: Config, tag: str = "check") -> Iterator[int]:
    """config's gateway started (for a check before the rounds); yields its port, stops it after."""
    port = free_port()
    proc, _ = bench.start_variant(config, port, f"{config.key}-{tag}")
    try:
        yield port
    finally:
        stop(proc)


def report(bench: Bench, configs: dict[str, Config], header: dict[str, str], title: str, extra: list[str]) -> str:
    args = bench.args
    headers = sorted({h.split(":")[0] for c in configs.values() for h in c.headers})
    notes = [
        rounds_note(args, "variant")
        + (f" (with the variant's {', '.join(headers)} header)" if headers else "") + ". "
        f"Gateway: {args.workers} worker(s), [log] access = false; upstream: nginx, 1 worker, 100-byte JSON body.",
        "variant/d: per round, the variant's req/s over d's of the same round, median (min–max). CPU µs/req: "
        "CPU time of the gateway's process tree per request, median over rounds; vs d: the difference of the "
        f"medians. foreign CPU: % of one core used by processes this run did not start, the largest run (above "
        f"{FOREIGN_WARN:.0f}% the machine was busy: read CPU µs/req rather than req/s). errors: summed over rounds.",
    ] if len(configs) > 1 else []  # no variants: no gateway was run
    markdown = args.markdown
    out = (markdown_head(header, title) + [f"- {note}" for note in notes]) if markdown else text_head(header, title)
    if len(configs) > 1:
        named = {f"{c.key}. {c.label}": c for c in configs.values() if c.key != "d"}
        out += [""] + table(*plugin_cost_rows(configs, named, markdown, "variant", "d. gateway, no plugins"), markdown)
    out += ([""] + extra) if extra else []
    if notes and not markdown:
        out += [""] + [f"* {note.replace('`', '')}" for note in notes]
    return "\n".join(out) + "\n"
