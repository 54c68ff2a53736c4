"""Prometheus metrics of a worker, named ``plugway_*`` (``_total``, ``_seconds``).

In cluster mode every process writes its values to files in the
multiprocess directory (prometheus-client's multiprocess mode, set up by the
supervisor through ``PROMETHEUS_MULTIPROC_DIR``) and the admin listener
serves the sum over the workers. A gateway running on its own serves its
own registry.

Label values are bounded: routes and upstreams come from the configuration,
methods from the HTTP parser's fixed list, statuses are folded into classes.

The per-request metrics (``plugway_requests_total``, the two duration
histograms, and the plugins' metrics made with ``per_request=True``) are added
up in the worker and written out by ``flush``: once a second (with the worker's
heartbeat), before the worker answers a scrape, and when it stops. Each write to
the multiprocess files takes a lock and an mmap store; written per request, the
core's five cost 10 of the gateway's 100 µs of CPU per request, and the bundled
plugins' about 30 more with all of them on (scripts/bench, RESULTS.md). So a
scrape may miss up to a second of the other workers' requests, and a worker
killed with -9 loses its last second.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NO_ROUTE = "-"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._per_request: list[PerRequest] = []
        self.requests = self.counter(
            "plugway_requests_total", "Requests answered, by route, method and status class.",
            ("route", "method", "status_class"), per_request=True,
        )
        self.request_seconds = self.histogram(
            "plugway_request_duration_seconds", "Time from the request head to the last response byte.",
            ("route",), per_request=True,
        )
        self.upstream_seconds = self.histogram(
            "plugway_upstream_response_seconds", "Time from sending a request upstream to its response head.",
            ("upstream",), per_request=True,
        )
        self.in_flight = Gauge(
            "plugway_requests_in_flight", "Requests being handled now.", registry=registry,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "plugway_upstream_errors_total", "Failed attempts to get a response from an upstream, by reason.",
            ["upstream", "code"], registry=registry,
        )
        self.upstream_retries = Counter(
            "plugway_upstream_retries_total", "Tries made again, by upstream and what failed.",
            ["upstream", "reason"], registry=registry,
        )
        self.connections_refused = Counter(
            "plugway_connections_refused_total", "Client connections turned away before a request, by reason.",
            ["reason"], registry=registry,
        )

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = (), *,
                per_request: bool = False) -> Counter | PerRequest:
        """A counter in this gateway's registry, for plugins (create it in ``worker_started``).
        ``per_request``: for what changes on most requests; it is added up in the worker and
        written out with the gateway's own (see the module docstring), at the price of up to a
        second's lag in scrapes. Use it as a counter: ``labels(...).inc(n)`` or ``inc(n)``."""
        counter = Counter(name, documentation, labels, registry=self.registry)
        return self._batched(counter, _PendingCount) if per_request else counter

    def histogram(self, name: str, documentation: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS, *, per_request: bool = False) -> Histogram | PerRequest:
        """A histogram, for plugins; ``per_request`` as for ``counter``: ``labels(...).observe(x)``."""
        histogram = Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)
        return self._batched(histogram, _PendingObservations) if per_request else histogram

    def _batched(self, metric: Counter | Histogram, pending: type) -> PerRequest:
        batched = PerRequest(metric, pending)
        self._per_request.append(batched)
        return batched

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...] = (), mode: str = "livesum") -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry, multiprocess_mode=mode)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, f"{status // 100}xx").inc()
        if status != 101:  # a WebSocket's lifetime (minutes) is not a request duration
            self.request_seconds.labels(route).observe(seconds)

    def upstream_answered(self, upstream: str, seconds: float) -> None:
        self.upstream_seconds.labels(upstream).observe(seconds)

    def flush(self) -> None:
        """Write what the per-request metrics added up since the last flush."""
        for metric in self._per_request:
            metric.flush()

    def upstream_retried(self, upstream: str, reason: str) -> None:
        self.upstream_retries.labels(upstream, reason).inc()

    def upstream_failed(self, upstream: str, code: str) -> None:
        self.upstream_errors.labels(upstream, code).inc()

    def exposition(self) -> bytes:
        self.flush()
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)


class PerRequest:
    """A counter or histogram made with ``per_request=True`` (the core's or a plugin's): its
    series count here until ``GatewayMetrics.flush`` writes them, and are kept, so ``labels``
    needs no cache of its own in the caller."""

    def __init__(self, metric: Counter | Histogram, pending: type) -> None:
        self._metric = metric
        self._pending = pending
        self._series: dict[tuple[str, ...], _PendingCount | _PendingObservations] = {}

    def labels(self, *values: str) -> _PendingCount | _PendingObservations:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = self._pending(self._metric.labels(*values) if values else self._metric)
        return series

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def flush(self) -> None:
        for series in self._series.values():
            series.flush()


class _PendingCount:
    """What one counter series counted since the last flush."""

    __slots__ = ("series", "amount")

    def __init__(self, series: Counter) -> None:
        self.series = series
        self.amount = 0.0

    def inc(self, amount: float = 1) -> None:
        self.amount += amount

    def flush(self) -> None:
        if self.amount:
            self.series.inc(self.amount)
            self.amount = 0.0


class _PendingObservations:
    """Observations of one histogram series since the last flush, counted in its buckets.

    Written with the histogram's own value objects (``_sum``, ``_buckets``, ``_upper_bounds``),
    which ``observe`` updates one by one: prometheus-client's internals, so tests/test_metrics.py
    checks the result against ``observe`` itself.
    """

    __slots__ = ("series", "bounds", "counts", "total")

    def __init__(self, series: Histogram) -> None:
        self.series = series
        self.bounds = series._upper_bounds  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bucket with seconds <= bound
        self.total += seconds

    def flush(self) -> None:
        if not any(self.counts):
            return
        self.series._sum.inc(self.total)
        for index, count in enumerate(self.counts):
            if count:
                self.series._buckets[index].inc(count)
                self.counts[index] = 0
        self.total = 0.0


class SupervisorMetrics:
    """What only the supervisor knows: workers alive, restarts, reloads, the config generation."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.workers = Gauge("plugway_workers_alive", "Workers ready to serve.", registry=registry,
                             multiprocess_mode="livemax")
        self.restarts = Counter("plugway_worker_restarts_total", "Workers replaced, by reason.", ["reason"],
                                registry=registry)
        self.reloads = Counter("plugway_reloads_total", "Configuration reloads, by result.", ["result"],
                               registry=registry)
        self.generation = Gauge("plugway_config_generation", "Generation of the configuration being served.",
                                registry=registry, multiprocess_mode="livemax")

    def worker_dead(self, pid: int) -> None:
        directory = multiprocess_dir()
        if directory is not None:
            mark_process_dead(pid, directory)
