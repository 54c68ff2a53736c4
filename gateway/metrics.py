"""Prometheus metrics of a worker, named ``plugway_*`` (``_total``, ``_seconds``).

In cluster mode every process writes its values to files in the
multiprocess directory (prometheus-client's multiprocess mode, set up by the
supervisor through ``PROMETHEUS_MULTIPROC_DIR``) and the admin listener
serves the sum over the workers. A gateway running on its own serves its
own registry.

Label values are bounded: routes and upstreams come from the configuration,
methods from the HTTP parser's fixed list, statuses are folded into classes.
"""

from __future__ import annotations

import os

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
        self.requests = Counter(
            "plugway_requests_total", "Requests answered, by route, method and status class.",
            ["route", "method", "status_class"], registry=registry,
        )
        self.request_seconds = Histogram(
            "plugway_request_duration_seconds", "Time from the request head to the last response byte.",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_seconds = Histogram(
            "plugway_upstream_response_seconds", "Time from sending a request upstream to its response head.",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=registry,
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
        self._children: dict[tuple, object] = {}

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        """A counter in this gateway's registry, for plugins (create it in ``worker_started``)."""
        return Counter(name, documentation, labels, registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...] = (), mode: str = "livesum") -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry, multiprocess_mode=mode)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status // 100)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(route, method, f"{status // 100}xx")
        counter.inc()
        if status == 101:
            return  # a WebSocket's lifetime (minutes) is not a request duration
        histogram = self._children.get(route)
        if histogram is None:
            histogram = self._children[route] = self.request_seconds.labels(route)
        histogram.observe(seconds)

    def upstream_answered(self, upstream: str, seconds: float) -> None:
        key = ("upstream", upstream)
        histogram = self._children.get(key)
        if histogram is None:
            histogram = self._children[key] = self.upstream_seconds.labels(upstream)
        histogram.observe(seconds)

    def upstream_retried(self, upstream: str, reason: str) -> None:
        self.upstream_retries.labels(upstream, reason).inc()

    def upstream_failed(self, upstream: str, code: str) -> None:
        self.upstream_errors.labels(upstream, code).inc()

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)


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
