"""A worker and Python's garbage collector: long-lived objects kept out of its walks, every pause measured.

CPython's collector stops the worker's event loop while it runs, and a full
(generation 2) collection walks every tracked object the worker holds. With
thousands of open WebSockets that is hundreds of thousands of objects, and
each full collection held every request on that worker for 400 ms
(loadtest/ws_bench.py, RESULTS.md).

So a full collection that takes more than ``[server] gc_freeze_pause`` (20 ms)
of CPU freezes what survived it (``gc.freeze``): alive at that moment and likely to stay
alive (connections, pools, caches), it is left out of the next full collections,
which walk only what became long-lived since. Only long pauses freeze: a
frozen object that later dies inside a reference cycle is not reclaimed until
the next thaw, and freezing after every full collection, the short ones of
plain HTTP traffic too, froze requests in flight that way; the workers then
grew by 0.2-0.3 MiB a minute under load (loadtest/soak_bench.py, RESULTS.md
06:13), where with the threshold nothing is frozen and memory stays flat (06:48).

Such objects are reclaimed by the thaw: ``gc_thaw_interval`` after the first
freeze, the worker unfreezes everything and runs one full collection, the one
long pause of that interval (which freezes its survivors again when it is
long). ``gc_freeze_pause = 0`` leaves the collector as CPython ships it.

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
    """This process's collections, timed into ``plugway_gc_pause_seconds``; the survivors of a
    full one that took more than ``freeze_after`` seconds of CPU frozen, and thawed
    ``thaw_interval`` seconds after the first freeze (see the module docstring; 0 turns either
    off).

    A ``gc.callbacks`` entry between ``install`` and ``remove``; the pauses are added up in the
    worker like the per-request metrics (a young collection runs every few hundred allocations).
    """

    def __init__(self, metrics: GatewayMetrics, freeze_after: float = 0.0, thaw_interval: float = 0.0) -> None:
        histogram = metrics.histogram(
            "plugway_gc_pause_seconds", "Time the garbage collector held the worker, by generation collected.",
            ("generation",), buckets=PAUSE_BUCKETS, per_request=True,
        )
        self._pauses = [histogram.labels(str(generation)) for generation in range(3)]
        self._started = self._cpu_started = 0.0
        self.freeze_after = freeze_after
        self.thaw_interval = thaw_interval
        self.first_frozen: float | None = None  # monotonic time of the first freeze since the last thaw

    def install(self) -> None:
        gc.callbacks.append(self._on_collection)

    def remove(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def thaw_when_due(self) -> None:
        """Called about once a second: ``thaw_interval`` after the first freeze, unfreeze and
        collect everything (a long collection freezes its survivors again)."""
        if self.first_frozen is None or not self.thaw_interval:
            return
        if time.monotonic() - self.first_frozen < self.thaw_interval:
            return
        self.first_frozen = None
        gc.unfreeze()
        gc.collect()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        generation = info["generation"]
        if phase == "start":
            self._started = time.perf_counter()
            if generation == 2:
                self._cpu_started = time.thread_time()
            return
        self._pauses[generation].observe(time.perf_counter() - self._started)
        # The decision counts the collection's own CPU time: a worker descheduled by a busy machine
        # in the middle of a short collection has nothing worth freezing.
        if generation == 2 and self.freeze_after and time.thread_time() - self._cpu_started > self.freeze_after:
            gc.freeze()  # every tracked object is alive now: the collection has just ended
            if self.first_frozen is None:
                self.first_frozen = time.monotonic()
