"""Raw WebSocket bytes for tests that must do what no well-behaved client library would."""

from __future__ import annotations

import base64
import os


def raw_handshake(path: str, extra: str = "", version: str = "13", key: str | None = None) -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


def frame(opcode: int, payload: bytes, mask: bool = True) -> bytes:
    """One final frame of up to 125 bytes, masked as a client must (or not)."""
    key = os.urandom(4) if mask else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
    return bytes([0x80 | opcode, (0x80 if mask else 0) | len(payload)]) + key + body
