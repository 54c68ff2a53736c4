"""What the workers' garbage-collector policy costs plain HTTP: scripts/bench's config d (the
default, `gc_freeze_pause = "20ms"`) against the same gateway with freezing off, round-robin
(the harness of loadtest/variants.py).

    .venv/bin/python loadtest/gc_bench.py [--rounds 8] [--markdown]

    d         the gateway, no plugins, the default collector policy (gateway/garbage.py)
    control   the same as d, measured as a variant: how far two identical gateways differ
    nofreeze  the same with `gc_freeze_pause = 0`: the collector as CPython ships it
    always    `gc_freeze_pause = "1us"`: every full collection freezes its survivors

What the policy buys is measured with many open WebSockets (loadtest/ws_bench.py --server ...).
"""

import sys

import variants
from bench import Config


def configs(bench) -> list[Config]:
    return [Config("control", "gateway, as d (a control)", toml="", server='gc_freeze_pause = "20ms"'),
            Config("nofreeze", "gateway, gc_freeze_pause = 0", toml="", server="gc_freeze_pause = 0"),
            Config("always", 'gateway, gc_freeze_pause = "1us"', toml="", server='gc_freeze_pause = "1us"')]


if __name__ == "__main__":
    sys.exit(variants.main(sys.argv[1:], "loadtest/gc_bench.py", __doc__, configs))
