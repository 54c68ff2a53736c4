"""A worker and Python's garbage collector: long-lived objects kept out of its walks, every pause measured.

CPython's collector stops the worker's event loop while it runs, and a full
(generation 2) collection walks every tracked object the worker holds. With
thousands of open WebSockets that is hundreds of thousands of objects, and
each full collection held every request on that worker for 400 ms
(loadtest/ws_bench.py, RESULTS.md).

So, with ``[server] gc_freeze = true`` (the default), what survives a full
collection is frozen (``gc.freeze``): it is alive at that moment, it is likely
to stay alive (connections, pools, caches), and the next full collections walk
only what became long-lived since. The price is that a frozen object which
later dies inside a reference cycle is not reclaimed until the next thaw: every
``gc_thaw_interval`` the worker unfreezes everything and runs one full
collection, the one long pause of that interval, and freezes the survivors
again. ``gc_freeze = false`` leaves the collector as CPython ships it.

``plugway_gc_pause_seconds{generation}`` shows each pause, so that such a tail
can be told from a slow upstream.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import GatewayMetrics

PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def freeze_startup_objects() -> None:
    """Collect once, then put every object that start-up left (modules, plugins, settings,
    pools) out of the collector's reach: a full collection then walks only what requests
    created. Without it, those walks over hundreds of thousands of long-lived objects were the
    tail of the latency under load (scripts/bench: p99 21-25 ms, with it 8-9 ms)."""
    gc.collect()
    gc.freeze()


class Collector:
    """This process's collections, timed into ``plugway_gc_pause_seconds`` and, with
    ``freeze``, the survivors of each full one frozen (see the module docstring).

    A ``gc.callbacks`` entry between ``install`` and ``remove``; the pauses are added up in the
    worker like the per-request metrics (a young collection runs every few hundred allocations).
    """

    def __init__(self, metrics: GatewayMetrics, freeze: bool = False, thaw_interval: float = 0.0) -> None:
        histogram = metrics.histogram(
            "plugway_gc_pause_seconds", "Time the garbage collector held the worker, by generation collected.",
            ("generation",), buckets=PAUSE_BUCKETS, per_request=True,
        )
        self._pauses = [histogram.labels(str(generation)) for generation in range(3)]
        self._started = 0.0
        self.freeze = freeze
        self.thaw_interval = thaw_interval
        self._next_thaw = time.monotonic() + thaw_interval

    def install(self) -> None:
        gc.callbacks.append(self._on_collection)

    def remove(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def thaw_when_due(self) -> None:
        """Called about once a second: past ``thaw_interval``, unfreeze and collect everything
        (the callback freezes the survivors again)."""
        if not (self.freeze and self.thaw_interval) or time.monotonic() < self._next_thaw:
            return
        self._next_thaw = time.monotonic() + self.thaw_interval
        gc.unfreeze()
        gc.collect()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self._pauses[generation].observe(time.perf_counter() - self._started)
        if generation == 2 and self.freeze:
            gc.freeze()  # every tracked object is alive now: the collection has just ended
