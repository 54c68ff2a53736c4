"""JSON bodies: which ones may be transformed, reading them within bounds, and (de)compression.

A body is transformed only when its media type is JSON (``application/json``
or ``*/*+json``), its size is known and at most ``max_body``, and its
encoding is identity, gzip or deflate. Everything else is left to stream as
it is, and ``Skip`` names why, for the metric. A compressed body is
decompressed (never beyond ``max_body``, so a compression bomb is skipped),
transformed and compressed again with the same coding.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

from gateway.errors import GatewayError

_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


class InvalidJsonBody(GatewayError):
    status, code, message = 400, "invalid_json", "the request body is not valid JSON"


class Skip(Exception):
    """The body is passed on untouched; ``reason`` labels the metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotJson(ValueError):
    pass


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json") and "/" in media


def check_size(size: int | None, limit: int) -> None:
    if size is None:
        raise Skip("no_length")
    if size > limit:
        raise Skip("too_large")


def coding_of(content_encoding: str | None, compressed: str) -> str | None:
    """The one content coding to undo (None for identity), or ``Skip``."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in _WBITS:
        raise Skip("unsupported_encoding")
    if compressed == "pass":
        raise Skip("compressed")
    return coding


def transform_json(raw: bytes, coding: str | None, limit: int, edit: Callable[[Any], bool]) -> bytes | None:
    """The body after ``edit`` (which changes the document in place and says whether it did),
    or None when nothing changed. ``NotJson`` if it does not parse; ``Skip`` if it cannot be decoded."""
    text = _decompress(raw, coding, limit) if coding else raw
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise NotJson() from None
    if not edit(document):
        return None
    try:
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a number beyond a float (1e400) parses as infinity, which JSON cannot write back
        raise Skip("unsupported_number") from None
    return _compress(body, coding) if coding else body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decompress(raw: bytes, coding: str, limit: int) -> bytes:
    decoder = zlib.decompressobj(_WBITS[coding])
    try:
        text = decoder.decompress(raw, limit + 1)
    except zlib.error:
        raise Skip("bad_encoding") from None
    if len(text) > limit or decoder.unconsumed_tail:
        raise Skip("too_large")
    if not decoder.eof:
        raise Skip("bad_encoding")
    return text


def _compress(body: bytes, coding: str) -> bytes:
    encoder = zlib.compressobj(6, zlib.DEFLATED, _WBITS[coding])
    return encoder.compress(body) + encoder.flush()
