"""Why a WebSocket handshake is refused: each refusal is a GatewayError with its status and code.

The client always gets an ordinary HTTP answer in the core's JSON shape, never a 101 followed by
a close: a handshake is refused before anything is upgraded.
"""

from __future__ import annotations

from gateway import GatewayError
from gateway.errors import UpstreamTimeout, UpstreamUnreachable  # the core's, reused as they are

__all__ = [
    "BadHandshake", "Draining", "OriginNotAllowed", "TooManyForConsumer", "UnsupportedVersion", "UpgradeRequired",
    "UpstreamRefused", "UpstreamTimeout", "UpstreamUnreachable", "WorkerFull",
]


class BadHandshake(GatewayError):
    status, code, message, close = 400, "bad_websocket_handshake", "the WebSocket handshake is malformed", True


class UnsupportedVersion(GatewayError):
    """RFC 6455 section 4.4: tell the client which version the gateway speaks."""

    status, code, message, close = 426, "unsupported_websocket_version", "only WebSocket version 13 is supported", True

    def __init__(self) -> None:
        super().__init__(headers=[("Sec-WebSocket-Version", "13")])


class UpgradeRequired(GatewayError):
    """A plain HTTP request on a route set to ``require_websocket``."""

    status, code, message = 426, "websocket_required", "this route serves WebSocket connections only"

    def __init__(self) -> None:
        super().__init__(headers=[("Upgrade", "websocket")])


class OriginNotAllowed(GatewayError):
    status, code, message = 403, "origin_not_allowed", "WebSocket connections from this origin are not allowed"


class TooManyForConsumer(GatewayError):
    status, code, message = 429, "too_many_websockets", "this client has too many open WebSocket connections"

    def __init__(self) -> None:
        super().__init__(headers=[("Retry-After", "1")])


class WorkerFull(GatewayError):
    status, code, message = 503, "websocket_capacity", "the gateway holds as many WebSocket connections as it may"

    def __init__(self) -> None:
        super().__init__(headers=[("Retry-After", "1")])


class Draining(GatewayError):
    status, code, message = 503, "websocket_draining", "this gateway worker is shutting down; connect again"

    def __init__(self) -> None:
        super().__init__(headers=[("Retry-After", "0")])


class UpstreamRefused(GatewayError):
    """The upstream answered the handshake with something other than a valid 101 (never tunnelled)."""

    status, code = 502, "upstream_refused_websocket"

