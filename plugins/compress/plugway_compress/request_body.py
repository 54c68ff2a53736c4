"""Decompressing a client's request body, for routes that allow it, within a fixed memory bound.

The gateway can replace a request body only with bytes in memory
(``OutgoingRequest.set_body``), so the decompressed body is held whole:
each such request costs up to ``max_decompressed_size`` bytes plus one read
chunk. The compressed input is decoded as it arrives (never held whole) and
counted against the core's ``client_max_body``. Past either cap the client
gets 413 and the connection is closed, the rest of its body unread.
"""

from __future__ import annotations

from typing import Any

from gateway import GatewayError

from .codecs import BrotliDecoder, InvalidData, TooLarge, ZlibDecoder


class DecompressedBodyTooLarge(GatewayError):
    status, code, close = 413, "decompressed_body_too_large", True
    message = "the request body is larger than allowed once decompressed"


class InvalidContentEncoding(GatewayError):
    status, code, close = 400, "invalid_content_encoding", True
    message = "the request body is not valid for its Content-Encoding"


async def read_decompressed(ctx: Any, decoder: ZlibDecoder | BrotliDecoder, max_size: int) -> bytes:
    """The client's whole body, decompressed (the core's body limits apply to the compressed input)."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in ctx.body_chunks():
            part = decoder.feed(chunk, max_size - size)
            size += len(part)
            parts.append(part)
        decoder.finish()
    except TooLarge:
        raise DecompressedBodyTooLarge() from None
    except InvalidData:
        raise InvalidContentEncoding() from None
    return b"".join(parts)
