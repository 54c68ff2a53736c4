"""What a transform rule costs: requests/s through the gateway with no plugins, with one header
rule, and with one JSON body rule, measured by the harness of scripts/bench (loadtest/variants.py).

    scripts/install && .venv/bin/python plugins/transform/bench_transform.py [--rounds 3] [--duration 5] [--markdown]

It needs wrk and nginx (scripts/bench installs them). The upstream is scripts/bench's nginx
answering `GET /` with a fixed 100-byte JSON body. Each round starts each configuration fresh,
in turn (round-robin), warms it up, then measures it with wrk; the ratios to "no plugins" are
computed per round, and their median is what to read (see loadtest/README.md on noise).

    d  the gateway, no plugins
    h  transform with one request header rule: set_headers = { X-Client = "{header.User-Agent}" }
    j  transform with one response JSON body rule: rename_body = { service = "name" }
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import variants  # noqa: E402  (loadtest/variants.py: scripts/bench's harness, for variants of the gateway)
from bench import Bench, BenchError, Config  # noqa: E402
from harness import http_get  # noqa: E402

VARIANTS = [
    Config("h", "transform, 1 header rule", toml='[plugins.transform]\n[[plugins.transform.request]]\n'
                                                 'set_headers = { X-Client = "{header.User-Agent}" }\n'),
    Config("j", "transform, 1 JSON body rule", toml='[plugins.transform]\n[[plugins.transform.response]]\n'
                                                    'rename_body = { service = "name" }\n'),
]


def check_body_rule(bench: Bench, configs: dict[str, Config]) -> None:
    """The JSON rule really rewrites the upstream's body (otherwise j would measure nothing)."""
    with variants.running(bench, configs["j"]) as port:
        status, body = http_get(port)
    if status != 200 or b'"name":"upstream"' not in body:
        raise BenchError(f"the JSON body rule did not apply: {status} {body[:200]!r}")


if __name__ == "__main__":
    sys.exit(variants.main(sys.argv[1:], "plugins/transform/bench_transform.py", __doc__, lambda bench: VARIANTS,
                           check=check_body_rule))
