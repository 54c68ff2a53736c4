"""Listening sockets, created by whoever owns them (the supervisor, or ``plugway run`` alone).

Client-facing sockets are bound with SO_REUSEPORT so that each worker slot
has its own accept queue and the kernel spreads connections across them.
An IPv6 address such as ``[::]:8080`` listens on IPv6 only, as nginx does;
list ``0.0.0.0:8080`` too for IPv4.
"""

from __future__ import annotations

import socket

from .config.model import parse_address


def bind_listener(address: str, *, backlog: int, reuse_port: bool = True) -> socket.socket:
    host, port = parse_address(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE,
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, address) from None
    return sock
