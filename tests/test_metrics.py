"""The per-request metrics, added up in the worker and flushed, read as if each had been
written at once."""

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.metrics import LATENCY_BUCKETS, GatewayMetrics

DURATIONS = [0.0, 0.001, 0.0011, 0.3, 5.0, 31.0, 0.0004]  # on bounds, between them, past the last


def samples(registry: CollectorRegistry, *names: str) -> dict:
    """The samples of the families named (every family when none is), by name and labels."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() if not names or family.name in names for sample in family.samples
            if not sample.name.endswith("_created")}


REQUEST_FAMILIES = ("plugway_requests", "plugway_request_duration_seconds", "plugway_upstream_response_seconds")


def test_the_core_request_metrics_once_flushed_equal_the_same_written_one_by_one():
    batched = GatewayMetrics()
    for seconds in DURATIONS:
        batched.request_done("api", "GET", 200, seconds)
        batched.upstream_answered("app", seconds)
    batched.request_done("ws", "GET", 101, 60.0)  # counted, but no duration
    assert set(samples(batched.registry, "plugway_requests").values()) == {0.0}  # not flushed yet
    batched.flush()
    batched.flush()  # nothing twice

    direct = CollectorRegistry()
    requests = Counter("plugway_requests_total", "", ("route", "method", "status_class"), registry=direct)
    request_seconds = Histogram("plugway_request_duration_seconds", "", ("route",), buckets=LATENCY_BUCKETS,
                                registry=direct)
    upstream_seconds = Histogram("plugway_upstream_response_seconds", "", ("upstream",), buckets=LATENCY_BUCKETS,
                                 registry=direct)
    for seconds in DURATIONS:
        requests.labels("api", "GET", "2xx").inc()
        request_seconds.labels("api").observe(seconds)
        upstream_seconds.labels("app").observe(seconds)
    requests.labels("ws", "GET", "1xx").inc()
    assert samples(batched.registry, *REQUEST_FAMILIES) == samples(direct)
    assert len(LATENCY_BUCKETS) + 1 == sum(1 for name, labels in samples(direct)
                                           if name == "plugway_request_duration_seconds_bucket")


def test_a_plugins_per_request_metrics_count_like_plain_ones_once_flushed():
    batched, direct = GatewayMetrics(), GatewayMetrics()
    made = [(metrics.counter("plugway_x_total", "x", ("route",), per_request=per_request),
             metrics.counter("plugway_y_total", "y", per_request=per_request),
             metrics.histogram("plugway_z_seconds", "z", ("route",), per_request=per_request))
            for metrics, per_request in ((batched, True), (direct, False))]
    for labelled, bare, histogram in made:
        for seconds in DURATIONS:
            labelled.labels("api").inc()
            labelled.labels("other").inc(2.5)
            bare.inc()
            histogram.labels("api").observe(seconds)
    assert samples(batched.registry) != samples(direct.registry)  # counted in the worker only
    batched.flush()
    assert samples(batched.registry) == samples(direct.registry)
    assert samples(direct.registry)[("plugway_x_total", (("route", "other"),))] == 2.5 * len(DURATIONS)
