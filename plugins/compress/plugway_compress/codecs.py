"""Streaming compressors and size-bounded decompressors for gzip, deflate and (when installed) brotli.

A compressor flushes after every chunk it is given (``Z_SYNC_FLUSH``, brotli's
``flush``), so the gateway never holds back bytes the upstream already sent:
a server-sent event or a long poll reaches the client as soon as it would
have uncompressed. The cost is a few bytes per chunk.

A decompressor never produces more than the room it is given plus one
bounded step, so a bomb (a few KiB that inflate to gigabytes) is stopped
after at most ``room`` bytes of output.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Callable

try:
    import brotli
except ImportError:  # optional: pip install plugway-compress[brotli]
    brotli = None

# brotli 1.2 added output_buffer_limit, without which a decompressor cannot be bounded.
BROTLI = brotli is not None
BROTLI_DECODE = BROTLI and hasattr(brotli.Decompressor, "can_accept_more_data")
_GZIP_WBITS = 31
_ZLIB_WBITS = 15


class TooLarge(Exception):
    """The decompressed data would exceed the room given."""


class InvalidData(Exception):
    """The data is not valid for its coding (or is cut short)."""


class GzipCompressor:
    __slots__ = ("_z",)

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class BrotliCompressor:
    __slots__ = ("_b",)

    def __init__(self, quality: int) -> None:
        self._b = brotli.Compressor(quality=quality)

    def compress(self, chunk: bytes) -> bytes:
        return self._b.process(chunk) + self._b.flush()

    def finish(self) -> bytes:
        return self._b.finish()


def compressor(encoding: str, gzip_level: int, brotli_quality: int) -> GzipCompressor | BrotliCompressor:
    return BrotliCompressor(brotli_quality) if encoding == "br" else GzipCompressor(gzip_level)


def compress_whole(encoding: str, gzip_level: int, brotli_quality: int, data: bytes) -> bytes:
    if encoding == "br":
        return brotli.compress(data, quality=brotli_quality)
    z = zlib.compressobj(gzip_level, zlib.DEFLATED, _GZIP_WBITS)
    return z.compress(data) + z.flush()


class ZlibDecoder:
    """gzip (every member of a multi-member stream) or zlib-wrapped deflate."""

    __slots__ = ("_wbits", "_z")

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._z = zlib.decompressobj(wbits)

    def feed(self, data: bytes, room: int) -> bytes:
        out = []
        try:
            while True:
                piece = self._z.decompress(data, room + 1)
                room -= len(piece)
                if room < 0:
                    raise TooLarge()
                out.append(piece)
                if self._z.eof:
                    data = self._z.unused_data
                    if not data:
                        break
                    self._z = zlib.decompressobj(self._wbits)  # the next gzip member
                    continue
                data = self._z.unconsumed_tail
                if not data and not piece:
                    break
        except zlib.error:
            raise InvalidData() from None
        return b"".join(out)

    def finish(self) -> None:
        if not self._z.eof:
            raise InvalidData()


class BrotliDecoder:
    __slots__ = ("_b",)

    def __init__(self) -> None:
        self._b = brotli.Decompressor()

    def feed(self, data: bytes, room: int) -> bytes:
        out = []
        try:
            while True:
                piece = self._b.process(data, output_buffer_limit=room + 1)
                room -= len(piece)
                if room < 0:
                    raise TooLarge()
                out.append(piece)
                data = b""
                if self._b.can_accept_more_data():
                    break
        except brotli.error:
            raise InvalidData() from None
        return b"".join(out)

    def finish(self) -> None:
        if not self._b.is_finished():
            raise InvalidData()


def decoder(content_encoding: str) -> ZlibDecoder | BrotliDecoder | None:
    """A decoder for a request's Content-Encoding, or None when it is not one this plugin undoes."""
    coding = content_encoding.strip().lower()
    if coding in ("gzip", "x-gzip"):
        return ZlibDecoder(_GZIP_WBITS)
    if coding == "deflate":
        return ZlibDecoder(_ZLIB_WBITS)
    if coding == "br" and BROTLI_DECODE:
        return BrotliDecoder()
    return None


async def compressed_stream(
    chunks: AsyncIterator[bytes], stream: GzipCompressor | BrotliCompressor, account: Callable[[int, int], None],
) -> AsyncIterator[bytes]:
    """``chunks`` compressed as they come; ``account(bytes_in, bytes_out)`` once it ends (or stops).

    Never yields an empty chunk: the gateway writes each chunk as an HTTP/1.1
    chunk, and an empty one would end the body.
    """
    size_in = size_out = 0
    try:
        async for chunk in chunks:
            if chunk:
                out = stream.compress(chunk)
                size_in += len(chunk)
                size_out += len(out)
                if out:
                    yield out
        tail = stream.finish()
        size_out += len(tail)
        if tail:
            yield tail
    finally:
        account(size_in, size_out)
