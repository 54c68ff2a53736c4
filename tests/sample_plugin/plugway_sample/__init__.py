"""A third-party plugin as a plugin author would write one: it implements every hook.

It tags requests and responses so tests can see which hooks ran, in which
order, and with which per-route settings. ``EVENTS`` records lifecycle and
log-phase calls in this process.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from gateway import GatewayError, PluginDeclaration, Response, hookimpl, setting

EVENTS: list[str] = []


@dataclass(frozen=True)
class SampleSettings:
    tag: str = setting("sample", doc="Name written into the X-Sample-* headers.")
    refuse_with: int | None = setting(None, doc="Answer every request with this status instead of proxying.")
    fallback_status: int | None = setting(None, doc="Answer with this status when the upstream fails.")
    body_suffix: str | None = setting(None, doc="Append this text to response bodies.")
    fail_start: str | None = setting(None, doc="Fail the worker's start-up with this message.")
    hang_start: float = setting(0.0, doc="Seconds to wait in worker_started before the worker can report ready.")
    hang_start_marker: str | None = setting(
        None, doc="With hang_start: the first worker to create this file starts at once, only later ones hang.",
    )


class SampleRefused(GatewayError):
    status, code, message = 401, "sample_refused", "the sample plugin refuses this request"


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=SampleSettings, priority=500)


@hookimpl
async def worker_started(gateway):
    EVENTS.append("worker_started")
    for settings in dict.fromkeys(gateway.plugin_settings("sample").values()):  # each distinct table once
        if settings.fail_start:
            raise RuntimeError(settings.fail_start)
        if settings.hang_start and not _first_to_create(settings.hang_start_marker):
            await asyncio.sleep(settings.hang_start)


def _first_to_create(marker: str | None) -> bool:
    """Whether this process created ``marker`` (False when it existed already, or when there is none)."""
    if marker is None:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@hookimpl
def worker_draining(gateway):
    EVENTS.append("worker_draining")


@hookimpl
def worker_stopping(gateway):
    EVENTS.append("worker_stopping")


@hookimpl
async def on_request(ctx, settings):
    ctx.state.setdefault("order", []).append(f"{settings.tag}:on_request")
    if settings.refuse_with == 401:
        raise SampleRefused()
    if settings.refuse_with is not None:
        return Response.json({"refused_by": settings.tag}, status=settings.refuse_with)
    return None


@hookimpl
def before_upstream(ctx, settings, outgoing):
    ctx.state.setdefault("order", []).append(f"{settings.tag}:before_upstream")
    outgoing.headers["X-Sample-Tag"] = settings.tag


@hookimpl
def on_error(ctx, settings, error):
    ctx.state.setdefault("order", []).append(f"{settings.tag}:on_error")
    if settings.fallback_status is not None:
        return Response.json({"fallback": error.code}, status=settings.fallback_status)
    return None


@hookimpl
async def on_response(ctx, settings, response):
    order = ctx.state.setdefault("order", [])
    order.append(f"{settings.tag}:on_response")
    response.headers["X-Sample-Order"] = ",".join(order)
    if settings.body_suffix is not None:
        body = await response.read(1 << 20)
        response.set_body(body + settings.body_suffix.encode())


@hookimpl
def after_response(ctx, settings):
    EVENTS.append(f"after_response:{ctx.status}")


@hookimpl
def admin_routes(gateway):
    from aiohttp import web

    async def counter(request):
        value = await gateway.store.incr("sample:admin-calls")
        return web.json_response({"calls": value})

    return [("POST", "/sample/counter", counter)]


@hookimpl
def cli_commands(commands):
    hello = commands.add_parser("sample-hello", help="say hello (an example plugin command)")
    hello.add_argument("name")
    hello.set_defaults(command=lambda args: print(f"hello, {args.name}") or 0)


@hookimpl
def websocket_open(ctx, settings):
    ctx.state["sample.ws"] = []


@hookimpl
def websocket_message(ctx, settings, message, direction):
    """Upper-cases text from the client; drops binary messages that are exactly b"drop"."""
    from gateway import DROP, WebSocketMessage

    if message.kind == "binary" and message.data == b"drop":
        return DROP
    if direction == "client" and message.kind == "text" and settings.tag == "upper":
        return WebSocketMessage("text", message.data.upper())
    return None


@hookimpl
def websocket_close(ctx, settings, code):
    EVENTS.append(f"websocket_close:{code}")
