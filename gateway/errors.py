"""Everything the gateway refuses or fails at, each kind knowing its status and code.

Clients always get the same JSON shape, never a traceback::

    {"error": {"status": 502, "code": "upstream_unreachable",
               "message": "...", "request_id": "..."}}

Plugins raise these (or subclasses of ``GatewayError``) to refuse a request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable


class GatewayError(Exception):
    """A failure with a client-facing status, a stable code and a public message.

    ``headers`` are added to the error response (``Allow``, ``Retry-After``,
    ``WWW-Authenticate``...). ``close`` asks for the client connection to be
    closed after the answer, for errors that leave the framing in doubt.
    """

    status = 500
    code = "internal_error"
    message = "the gateway failed to handle the request"
    close = False

    def __init__(self, message: str | None = None, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        if message is not None:
            self.message = message
        self.headers = tuple(headers)
        super().__init__(self.message)

    def body(self, request_id: str) -> bytes:
        return json.dumps(
            {"error": {"status": self.status, "code": self.code, "message": self.message, "request_id": request_id}},
            separators=(",", ":"),
        ).encode()


class BadRequest(GatewayError):
    status, code, message, close = 400, "bad_request", "the request is malformed", True


class BadRequestPath(BadRequest):
    code = "bad_path"


class RouteNotFound(GatewayError):
    status, code, message = 404, "route_not_found", "no route matches this request"


class MethodNotAllowed(GatewayError):
    """``route`` and ``params``: the route the path matched, when one did (for CORS preflights)."""

    status, code = 405, "method_not_allowed"

    def __init__(
        self, allowed: list[str], route: object = None, params: dict[str, str] | None = None, close: bool = False,
    ) -> None:
        super().__init__(f"allowed methods: {', '.join(allowed)}", headers=[("Allow", ", ".join(allowed))])
        self.route = route
        self.params = params or {}
        self.close = close


class RequestTimeout(GatewayError):
    status, code, message, close = 408, "request_timeout", "the request body stopped arriving", True


class BodyTooLarge(GatewayError):
    status, code, message, close = 413, "body_too_large", "the request body is larger than allowed", True


class UriTooLong(GatewayError):
    status, code, message, close = 414, "uri_too_long", "the request line is longer than allowed", True


class HeadersTooLarge(GatewayError):
    status, code, message, close = 431, "headers_too_large", "the request headers are larger than allowed", True


class ClientClosedRequest(GatewayError):
    """The client went away before the answer; logged as 499, never sent."""

    status, code, message = 499, "client_closed_request", "the client closed the connection"


class UpstreamUnreachable(GatewayError):
    status, code, message = 502, "upstream_unreachable", "the upstream could not be reached"


class UpstreamInvalidResponse(GatewayError):
    status, code, message = 502, "upstream_invalid_response", "the upstream sent an invalid response"


class NoTargetAvailable(GatewayError):
    status, code, message = 503, "no_target_available", "no upstream target is available"


class UpstreamBusy(GatewayError):
    status, code, message = 503, "upstream_busy", "every connection to the upstream is in use"


class UpstreamTimeout(GatewayError):
    status, code, message = 504, "upstream_timeout", "the upstream did not answer in time"
