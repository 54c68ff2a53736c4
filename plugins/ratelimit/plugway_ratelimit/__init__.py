"""Rate limiting over the gateway's shared store (see README.md for the settings).

Limits are checked in ``on_request``; a request must pass every limit of its
route, and a refused request is counted against none of them (the store's
``take`` is all or nothing). The store is shared by every worker of a host
(the local store) or of every host (Redis), so a limit of 100 a minute means
100 for the whole deployment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway import GatewayError, PluginDeclaration, hookimpl
from gateway.store import StoreUnavailable

from .policy import Caller, RateLimitSettings, applicable_limits, hash_api_key, rate_headers, retry_after

log = logging.getLogger("plugway.ratelimit")
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
WARN_EVERY_SECONDS = 10.0


class RateLimited(GatewayError):
    status, code, message = 429, "rate_limited", "too many requests; retry later"


class RateLimitUnavailable(GatewayError):
    status, code, message = 503, "rate_limit_unavailable", "rate limits cannot be checked right now"


@dataclass
class WorkerState:
    requests: Any
    store_errors: Any
    store_seconds: Any
    last_warning: float = 0.0


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=RateLimitSettings, priority=900)


@hookimpl
def worker_started(gateway):
    metrics = gateway.metrics
    gateway.state["ratelimit"] = WorkerState(
        requests=metrics.counter("plugway_ratelimit_requests_total", "Requests checked, by route, limit and result.",
                                 ("route", "limit", "result"), per_request=True),
        store_errors=metrics.counter("plugway_ratelimit_store_errors_total",
                                     "Checks the store could not answer, by the policy applied.", ("policy",)),
        store_seconds=metrics.histogram("plugway_ratelimit_store_seconds", "Time of one rate-limit check in the store.",
                                        ("backend",), buckets=STORE_BUCKETS, per_request=True),
    )


@hookimpl
async def on_request(ctx, settings):
    state = ctx.gateway.state["ratelimit"]
    consumer = ctx.consumer
    known = consumer is not None and not consumer.anonymous
    caller = Caller(
        route=ctx.route.name, consumer_id=consumer.id if known else None, roles=consumer.roles if consumer else (),
        client_ip=ctx.client_ip, api_key=hash_api_key(ctx.request.headers.get(settings.api_key_header)),
        header=ctx.request.headers,
    )
    pairs = applicable_limits(settings, caller)
    if not pairs:
        return None
    results = await _check(ctx, settings, [limit for _, limit in pairs], state)
    if results is None:
        return None
    specs = [spec for spec, _ in pairs]
    allowed = all(result.allowed for result in results)
    for spec, result in zip(specs, results):
        state.requests.labels(ctx.route.name, spec.name, "allowed" if allowed else
                              "limited" if not result.allowed else "not_counted").inc()
    headers = rate_headers(settings.headers, specs, results)
    if not allowed:
        raise RateLimited(headers=headers + [("Retry-After", str(retry_after(results)))])
    ctx.state["ratelimit"] = headers
    return None


@hookimpl
def on_response(ctx, response):
    for name, value in ctx.state.get("ratelimit", ()):
        response.headers[name] = value


async def _check(ctx, settings: RateLimitSettings, limits, state: WorkerState):
    """The store's answer, or the policy's when the store fails (None: let the request through)."""
    store = ctx.gateway.store
    started = time.monotonic()
    try:
        results = await store.take(limits)
        state.store_seconds.labels(store.name).observe(time.monotonic() - started)
        return results
    except StoreUnavailable as exc:
        policy = settings.on_store_error
        state.store_errors.labels(policy).inc()
        _warn(state, f"rate limits fall back to {policy}: {exc}")
    if policy == "fail_closed":
        raise RateLimitUnavailable(headers=[("Retry-After", "1")])
    if policy == "local" and ctx.gateway.local_store is not store:
        try:
            return await ctx.gateway.local_store.take(limits)
        except StoreUnavailable as exc:
            _warn(state, f"the local store failed too, letting requests through: {exc}")
    return None


def _warn(state: WorkerState, message: str) -> None:
    now = time.monotonic()
    if now - state.last_warning >= WARN_EVERY_SECONDS:
        state.last_warning = now
        log.warning(message)
