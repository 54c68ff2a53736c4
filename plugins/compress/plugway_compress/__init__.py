"""Response compression (gzip, and brotli when installed), and opt-in request decompression.

Responses stream through a compressor chunk by chunk (never buffered
whole); one already in memory is compressed at once and keeps a
Content-Length. What gets compressed is decided in ``encoding``; bytes in and
out are counted in ``plugway_compress_bytes_in_total{encoding}`` and
``plugway_compress_bytes_out_total{encoding}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Literal

from gateway import PluginDeclaration, Size, hookimpl, setting
from gateway.headers import add_vary

from .codecs import BROTLI, compress_whole, compressed_stream, compressor, decoder
from .encoding import MediaTypes, choose_encoding, compressible, weak_etag
from .request_body import read_decompressed

NAME = "compress"


@dataclass(frozen=True)
class CompressSettings:
    types: MediaTypes = setting(
        factory=MediaTypes, parse=MediaTypes.parse, render=MediaTypes.render,
        doc='Media types to compress: "type/subtype", "type/*" or "type/*+suffix".',
    )
    min_size: Size = setting(Size("1KiB"), doc="Smaller responses are sent as they are (unknown lengths compress).")
    encodings: tuple[Literal["br", "gzip"], ...] = setting(
        ("br", "gzip"), doc="Codings offered, preferred first on equal q-values; br only if brotli is installed.",
    )
    gzip_level: int = setting(5, doc="gzip level, 1 (fastest) to 9 (smallest).")
    brotli_quality: int = setting(4, doc="brotli quality, 0 (fastest) to 11 (smallest).")
    decompress_requests: bool = setting(False, doc="Decompress gzip/deflate/br request bodies before the upstream.")
    max_decompressed_size: Size = setting(
        Size("10MiB"), doc="413 beyond this decompressed size; each such body is held whole in memory.",
    )

    def validate(self):
        if not self.encodings or len(set(self.encodings)) != len(self.encodings):
            yield "encodings", 'must list "br", "gzip" or both, each once'
        elif not self.offered:
            yield "encodings", "brotli is not installed (pip install plugway-compress[brotli]); add \"gzip\""
        if not 1 <= self.gzip_level <= 9:
            yield "gzip_level", "must be between 1 and 9"
        if not 0 <= self.brotli_quality <= 11:
            yield "brotli_quality", "must be between 0 and 11"

    @cached_property
    def offered(self) -> tuple[str, ...]:
        return tuple(encoding for encoding in self.encodings if encoding != "br" or BROTLI)


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=CompressSettings, priority=1800)


@hookimpl
def worker_started(gateway):
    metrics = gateway.metrics
    bytes_in = metrics.counter("plugway_compress_bytes_in_total", "Response bytes compressed, by coding.",
                               ("encoding",), per_request=True)
    bytes_out = metrics.counter("plugway_compress_bytes_out_total", "Compressed response bytes sent, by coding.",
                                ("encoding",), per_request=True)
    gateway.state[NAME] = {
        encoding: partial(_account, bytes_in.labels(encoding), bytes_out.labels(encoding)) for encoding in ("br", "gzip")
    }


def _account(bytes_in, bytes_out, size_in: int, size_out: int) -> None:
    bytes_in.inc(size_in)
    bytes_out.inc(size_out)


@hookimpl
async def before_upstream(ctx, settings, outgoing):
    if not settings.decompress_requests or not ctx.request.body_exists:
        return None
    coding = ctx.request.headers.get("Content-Encoding")
    body_decoder = decoder(coding) if coding else None
    if body_decoder is None:
        return None  # identity, or a coding this plugin does not undo: forwarded as sent
    body = await read_decompressed(ctx, body_decoder, settings.max_decompressed_size)
    outgoing.headers.popall("Content-Encoding", None)
    outgoing.set_body(body)
    return None


@hookimpl
def on_response(ctx, settings, response):
    headers = response.headers
    body = response.body_in_memory()
    length = len(body) if body is not None else _content_length(headers.get("Content-Length"))
    if not compressible(ctx.method, response.status, headers, settings.types, settings.min_size, length):
        return
    add_vary(headers, "Accept-Encoding")
    encoding = choose_encoding(ctx.request.headers.get("Accept-Encoding", ""), settings.offered)
    if encoding is None:
        return
    headers["Content-Encoding"] = encoding
    etag = headers.get("ETag")
    if etag is not None:
        headers["ETag"] = weak_etag(etag)
    headers.popall("Accept-Ranges", None)
    account = ctx.gateway.state[NAME][encoding]
    if body is not None:
        compressed = compress_whole(encoding, settings.gzip_level, settings.brotli_quality, body)
        response.set_body(compressed)
        account(len(body), len(compressed))
    else:
        levels = (settings.gzip_level, settings.brotli_quality)
        response.wrap_body(lambda chunks: compressed_stream(chunks, compressor(encoding, *levels), account))


def _content_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None
