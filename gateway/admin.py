"""The admin listener: liveness, readiness and metrics, on its own address.

- ``GET /health``: 200 while the process serves (liveness).
- ``GET /ready``: 200 once plugins are started and listeners are open, 503
  while starting or draining (readiness, for load balancers).
- ``GET /metrics``: Prometheus text format.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .worker import Gateway

GATEWAY_KEY = web.AppKey("gateway", object)


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


def admin_app(gateway: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


async def start_admin(gateway: Gateway, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(admin_app(gateway), access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
