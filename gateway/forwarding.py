"""What the gateway adds to and removes from headers on the way through. Pure functions.

Hop-by-hop headers (RFC 9110 section 7.6.1) are removed in both directions:
``Connection`` and every header it names, ``Keep-Alive``, ``TE``,
``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-Connection``,
``Proxy-Authorization`` and ``Proxy-Authenticate``. The gateway frames every
body itself, so ``Content-Length``, ``Expect`` and ``Host`` from the client
are replaced too.

Forwarding headers (``X-Forwarded-For``, ``-Proto``, ``-Host``, ``Forwarded``,
``X-Real-IP``) and the request id are accepted from the client only when the
socket peer is in ``server.trusted_proxies``; from anyone else they are
replaced. The client address is the peer, or, behind trusted proxies, the
first address from the right of ``X-Forwarded-For`` that is not itself a
trusted proxy (nginx's ``real_ip_recursive``): a client can never choose it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable

from .headers import RawHeaders

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate",
})
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"})
_REFRAMED = frozenset({b"host", b"content-length", b"expect"})
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,200}")
_TRUST_CACHE_LIMIT = 4096


class TrustedProxies:
    """Which peers may speak for the client; answers are cached per address."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(network, strict=False) for network in networks)
        self._cache: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        known = self._cache.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        trusted = any(ip in network for network in self.networks)
        if len(self._cache) >= _TRUST_CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = trusted
        return trusted

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        if not forwarded_for or not self.networks or not self.trusts(peer):
            return peer
        candidate = peer
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if not _is_ip(hop):
                return candidate
            if not self.trusts(hop):
                return hop
            candidate = hop
        return candidate


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def header_values(raw: RawHeaders, lower_name: bytes) -> str | None:
    """Every value of one header, joined with ", " in order (RFC 9110 section 5.3)."""
    values = [value for name, value in raw if name.lower() == lower_name]
    if not values:
        return None
    return b", ".join(values).decode("latin-1")


def strip_request_headers(raw: RawHeaders, drop: frozenset[bytes], *, keep_underscored: bool = False) -> RawHeaders:
    """The client's headers minus hop-by-hop, re-framed and ``drop`` ones (lower-case names).

    A name with an underscore is dropped too, unless ``keep_underscored``; even
    then it is dropped when it spells a ``drop`` name with ``_`` for ``-``
    (``X_Consumer_ID``), because some frameworks read both spellings alike.
    """
    removed = HOP_BY_HOP | _REFRAMED | drop
    named: set[bytes] = set()
    kept = []
    for name, value in raw:
        lower = name.lower()
        if lower in removed:
            if lower == b"connection":
                named.update(connection_tokens(value))
            continue
        if b"_" in lower and (not keep_underscored or lower.replace(b"_", b"-") in drop):
            continue
        kept.append((name, value))
    if named - CONNECTION_OPTIONS:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


def connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def forwarding_headers(
    raw: RawHeaders, *, trusted: bool, peer: str, scheme: str, host: str | None,
) -> RawHeaders:
    """X-Forwarded-For/-Proto/-Host and Forwarded (RFC 7239) for the upstream."""
    previous_for = header_values(raw, b"x-forwarded-for") if trusted else None
    proto = (header_values(raw, b"x-forwarded-proto") if trusted else None) or scheme
    forwarded_host = (header_values(raw, b"x-forwarded-host") if trusted else None) or host
    previous_forwarded = header_values(raw, b"forwarded") if trusted else None
    node = f'"[{peer}]"' if ":" in peer else peer
    element = f"for={node};proto={scheme}" + (f';host="{_quote(host)}"' if host else "")
    headers = [
        (b"X-Forwarded-For", f"{previous_for}, {peer}".encode("latin-1") if previous_for else peer.encode()),
        (b"X-Forwarded-Proto", proto.encode("latin-1")),
        (b"Forwarded", f"{previous_forwarded}, {element}".encode("latin-1") if previous_forwarded else element.encode("latin-1")),
    ]
    if forwarded_host:
        headers.append((b"X-Forwarded-Host", forwarded_host.encode("latin-1")))
    return headers


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def request_id(supplied: str | None, trusted: bool) -> str:
    """The id a trusted client sent, if well-formed; otherwise a new random one."""
    if trusted and supplied and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return os.urandom(16).hex()

