"""The admin listener: liveness, readiness, metrics, cluster status and reload.

- ``GET /health``: 200 while the process serves (liveness).
- ``GET /ready``: 200 once plugins are started and listeners open, 503 while
  starting or draining (readiness, for load balancers).
- ``GET /metrics``: Prometheus text format, summed over every worker.
- ``GET /status``: the supervisor's pid, uptime, configuration generation and
  hash, and each worker's pid, slot, age, state and requests served.
- ``POST /reload``: ask the supervisor for a rolling reload (like SIGHUP);
  202, with the reload number to look for in ``/status``.
- ``GET /upstreams``: every upstream's targets with their health, ejection and
  in-flight requests (of the worker that answers), plus what plugins add (breaker state).

``/status``, ``/reload``, ``/upstreams`` and plugin endpoints need ``Authorization: Bearer TOKEN`` when
``admin.token_env`` names an environment variable holding the token; the
gateway refuses to serve the admin API on a non-loopback address without one.
In cluster mode the supervisor owns the admin socket and every worker serves
it, so any worker answers.
"""

from __future__ import annotations

import hmac
import os
import signal
import socket
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import runtime

if TYPE_CHECKING:
    from .worker import Gateway

GATEWAY_KEY = web.AppKey("gateway", object)
TOKEN_KEY = web.AppKey("token", object)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    if gateway.ready and not gateway.draining:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "draining" if gateway.draining else "starting"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    gateway.metrics.in_flight.set(gateway.in_flight)
    return web.Response(body=gateway.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    cluster = runtime.read_json(gateway.status_file) if gateway.status_file is not None else None
    if cluster is None:
        cluster = {"supervisor_pid": None, "workers": [{"pid": os.getpid(), "requests": gateway.requests_served}]}
    return web.json_response(cluster)


async def upstreams(request: web.Request) -> web.Response:
    """Each upstream and its targets as this worker sees them (health is shared by the host)."""
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    view = {}
    for name, upstream in gateway.upstreams.items():
        entry = upstream.describe()
        for annotate in gateway.upstream_annotations:
            entry.update(annotate(name))
        view[name] = entry
    return web.json_response({"worker_pid": os.getpid(), "upstreams": view})


async def reload(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    cluster = runtime.read_json(gateway.status_file) if gateway.status_file is not None else None
    if cluster is None:
        raise _json_error(409, "not_clustered", "this gateway runs without a supervisor")
    os.kill(cluster["supervisor_pid"], signal.SIGHUP)
    return web.json_response({"requested": True, "reloads_before": sum(cluster["reloads"].values())}, status=202)


def _authorize(request: web.Request) -> None:
    token = request.app[TOKEN_KEY]
    if token is None:
        return
    supplied = request.headers.get("Authorization", "")
    if not hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
        raise _json_error(401, "unauthorized", "a valid admin bearer token is required",
                          headers={"WWW-Authenticate": 'Bearer realm="plugway-admin"'})


def _json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    error = web.HTTPException(headers=headers)
    error.set_status(status)
    error.content_type = "application/json"
    error.text = f'{{"error": {{"status": {status}, "code": "{code}", "message": "{message}"}}}}'
    return error


def admin_token(token_env: str | None) -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env, "")
    if len(token) < 16:
        raise RuntimeError(f"the admin token in ${token_env} is missing or shorter than 16 characters")
    return token


def admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[GATEWAY_KEY] = gateway
    app[TOKEN_KEY] = admin_token(gateway.settings.admin.token_env)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_get("/upstreams", upstreams)
    app.router.add_post("/reload", reload)
    for routes in gateway.plugins.lifecycle("admin_routes"):
        for method, path, handler in routes(gateway=gateway) or ():
            app.router.add_route(method, path, _authorized(handler))
    return app


def _authorized(handler):
    """Plugin endpoints change state: the admin token is required (when one is configured)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        _authorize(request)
        return await handler(request)

    return guarded


async def start_admin(gateway: Gateway, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(admin_app(gateway), access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
