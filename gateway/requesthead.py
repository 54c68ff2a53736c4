"""What the gateway refuses in a request head that aiohttp's parser lets through. Pure functions.

aiohttp's C parser (llhttp) already refuses the classic smuggling vectors
(Content-Length with Transfer-Encoding, repeated or malformed
Content-Length, obs-fold, bare CR or LF, control characters, a missing or
repeated Host on HTTP/1.1). It accepts these, which the gateway refuses so
that it forwards only requests whose framing is unambiguous:

- a version other than HTTP/1.0 or HTTP/1.1 (505);
- a method outside ``server.methods`` (405; methods are case-sensitive);
- ``Transfer-Encoding`` that is anything but exactly ``chunked`` (``identity,
  chunked``, ``chunked, chunked``, two header lines), or on HTTP/1.0 (400);
- headers larger than ``server.max_header_total`` in all (431);
- a Host that is not one ``host[:port]`` (``Host: a, b``, spaces, a path): 400;
- an absolute-form target whose authority differs from Host, the asterisk
  form, or any other target that is not a path (400).

Every refusal closes the connection (``GatewayError.close``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import BadRequest, GatewayError, HeadersTooLarge, MethodNotAllowed


# RFC 3986 host (reg-name, IPv4, [IPv6]) and optional port; no list (",") and no spaces.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+;=%-]*)(?::[0-9]{0,5})?")


class VersionNotSupported(GatewayError):
    status, code, message, close = 505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served", True


class BadFraming(BadRequest):
    code = "bad_framing"


class BadTarget(BadRequest):
    code = "bad_target"


@dataclass(frozen=True)
class HeadRules:
    methods: frozenset[str]
    max_header_total: int

    @property
    def allowed(self) -> list[str]:
        return sorted(self.methods)


def check_head(
    rules: HeadRules, method: str, version: tuple[int, int], raw_headers: tuple[tuple[bytes, bytes], ...],
    target: str, host: str | None,
) -> str:
    """The origin-form target (path and query) of an acceptable request head, or a GatewayError."""
    if version != (1, 1) and version != (1, 0):
        raise VersionNotSupported()
    if method not in rules.methods:
        raise MethodNotAllowed(rules.allowed)
    size = 0
    encodings = []
    for name, value in raw_headers:
        size += len(name) + len(value) + 4
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            encodings.append(value)
    if size > rules.max_header_total:
        raise HeadersTooLarge()
    if host is not None and not _HOST.fullmatch(host):
        raise BadRequest("the Host header is not one host[:port]")
    if encodings:
        if version == (1, 0):
            raise BadFraming("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if len(encodings) != 1 or encodings[0].strip().lower() != b"chunked":
            raise BadFraming('Transfer-Encoding must be exactly "chunked"')
    if target.startswith("/"):
        return target
    return _origin_form(target, host)


def _origin_form(target: str, host: str | None) -> str:
    """The path of an absolute-form target, when its authority is the Host header's."""
    if target == "*":
        raise BadTarget("the asterisk-form target is not served")
    try:
        parts = urlsplit(target)
    except ValueError:  # found by scripts/fuzz: "http://[" is an invalid IPv6 authority
        raise BadTarget("the request target is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise BadTarget("the request target is not a path or an http URL")
    if host is None or parts.netloc.lower() != host.lower():
        raise BadTarget("the absolute-form target names another host than the Host header")
    path = target[len(parts.scheme) + 3 + len(parts.netloc):]
    return path if path.startswith("/") else "/" + path
