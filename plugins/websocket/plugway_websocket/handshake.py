"""The client's handshake, the Origin rule, and which headers cross the gateway. Pure functions.

A request asks for a WebSocket when its ``Upgrade`` header names ``websocket``. It must then be
a complete handshake (RFC 6455 section 4.2.1): GET over HTTP/1.1, ``Connection: upgrade``, a
``Sec-WebSocket-Key`` of 16 bytes in base64 and ``Sec-WebSocket-Version: 13``; otherwise it is
refused with 400, or 426 naming version 13 when only the version is wrong.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from yarl import URL

from .errors import BadHandshake, UnsupportedVersion

# Headers of the client's request that the gateway does not pass on as they are: aiohttp's client
# makes its own key and version, the offer goes through ``protocols``, no extension is negotiated
# (the gateway re-frames every message), and Host follows the route's ``preserve_host``.
_HANDSHAKE_ONLY = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept",
    "sec-websocket-protocol", "host",
})
# Headers of the upstream's 101 that the gateway does not copy to the client's 101.
_NOT_RELAYED = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "content-length", "sec-websocket-accept", "sec-websocket-protocol",
    "sec-websocket-extensions", "sec-websocket-version",
})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def tokens(value: str) -> list[str]:
    """The comma-separated tokens of a header value, stripped and lower-cased."""
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def wants_websocket(headers: Mapping[str, str]) -> bool:
    """Whether the request asks to upgrade to a WebSocket (it may still be malformed)."""
    return any("websocket" in tokens(value) for value in headers.getall("Upgrade", ()))


def check_handshake(method: str, version: tuple[int, int], headers: Mapping[str, str]) -> None:
    """Raise the refusal for an incomplete handshake; return for a valid one."""
    if method != "GET" or version < (1, 1):
        raise BadHandshake("a WebSocket handshake must be a GET request over HTTP/1.1")
    if not any("upgrade" in tokens(value) for value in headers.getall("Connection", ())):
        raise BadHandshake("a WebSocket handshake must send Connection: upgrade")
    keys = headers.getall("Sec-WebSocket-Key", ())
    if len(keys) != 1 or not _is_key(keys[0]):
        raise BadHandshake("Sec-WebSocket-Key must be 16 bytes in base64")
    if headers.getall("Sec-WebSocket-Version", ()) != ["13"]:
        raise UnsupportedVersion()


def _is_key(value: str) -> bool:
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def offered_protocols(headers: Mapping[str, str]) -> list[str]:
    """The subprotocols offered in ``Sec-WebSocket-Protocol``, in the client's order."""
    offered: list[str] = []
    for value in headers.getall("Sec-WebSocket-Protocol", ()):
        offered.extend(item.strip() for item in value.split(",") if item.strip())
    return offered


# --- Origin ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int


def parse_origin(text: str) -> Origin | None:
    """``scheme://host[:port]`` as a comparable value; None for anything else (``null`` included)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    return Origin(scheme, parts.hostname.lower().rstrip("."), port or _DEFAULT_PORTS[scheme])


def check_allowed_origin(entry: str) -> None:
    """Raise ValueError unless ``entry`` is "*", "null" or an origin, its host possibly "*.domain"."""
    if entry in ("*", "null"):
        return
    scheme, sep, rest = entry.partition("://")
    wildcard = rest.startswith("*.")
    origin = parse_origin(f"{scheme}://{rest[2:] if wildcard else rest}") if sep else None
    if origin is None or "*" in (rest[2:] if wildcard else rest):
        raise ValueError(f'{entry!r} is not an origin such as "https://app.example.com", "https://*.example.com" or "*"')


class OriginRule:
    """Which ``Origin`` values may open a WebSocket (protection against cross-site WebSocket hijacking).

    With no entries only the gateway's own origin (the scheme and Host the client used) is
    allowed. A handshake without ``Origin`` (not from a browser) passes unless ``required``.
    """

    __slots__ = ("any", "null", "exact", "suffixes", "required")

    def __init__(self, allowed: Iterable[str], required: bool) -> None:
        allowed = tuple(allowed)
        self.any = "*" in allowed
        self.null = "null" in allowed
        self.required = required
        self.exact: set[Origin] = set()
        self.suffixes: list[tuple[str, str, int]] = []
        for entry in allowed:
            if entry in ("*", "null"):
                continue
            scheme, _, rest = entry.partition("://")
            if rest.startswith("*."):
                origin = parse_origin(f"{scheme}://{rest[2:]}")
                self.suffixes.append((origin.scheme, "." + origin.host, origin.port))
            else:
                self.exact.add(parse_origin(entry))

    def allows(self, origin_header: str | None, scheme: str, host_header: str | None) -> bool:
        if origin_header is None:
            return not self.required
        if self.any:
            return True
        if origin_header.strip() == "null":
            return self.null
        origin = parse_origin(origin_header)
        if origin is None:
            return False
        if origin in self.exact or origin == _own_origin(scheme, host_header):
            return True
        return any(origin.scheme == s and origin.port == p and origin.host.endswith(suffix)
                   for s, suffix, p in self.suffixes)


def _own_origin(scheme: str, host_header: str | None) -> Origin | None:
    return parse_origin(f"{scheme}://{host_header}") if host_header else None


# --- towards the upstream and back -----------------------------------------------------------


def upstream_url(target_url: str, path: str, query: str) -> URL:
    """The ws:// or wss:// URL for a target ("http://host:port" or "https://...") and the outgoing path."""
    parts = urlsplit(target_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return URL(f"{scheme}://{parts.netloc}{path}" + (f"?{query}" if query else ""), encoded=True)


def upstream_headers(outgoing: Mapping[str, str], host: str) -> list[tuple[str, str]]:
    """The outgoing request's headers (forwarding, request id, what plugins set) for the upstream handshake."""
    headers = [(name, value) for name, value in outgoing.items() if name.lower() not in _HANDSHAKE_ONLY]
    headers.append(("Host", host))
    return headers


def relayed_response_headers(upstream: Mapping[str, str], request_id_header: str) -> list[tuple[str, str]]:
    """Headers of the upstream's 101 to copy into the client's (Set-Cookie and the like)."""
    named = {token for value in upstream.getall("Connection", ()) for token in tokens(value)}
    dropped = _NOT_RELAYED | named | {request_id_header.lower()}
    return [(name, value) for name, value in upstream.items() if name.lower() not in dropped]
