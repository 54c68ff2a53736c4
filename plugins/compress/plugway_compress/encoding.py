"""Whether a response may be compressed, and with which coding the client prefers (RFC 9110 12.5.3).

Pure functions of header values. A response is compressed only when all
hold: not an answer to HEAD; not 1xx, 204, 206 or 304; no Content-Encoding
already (``identity`` aside); no ``Cache-Control: no-transform``; no
Content-Range; a configured media type; and a length that is unknown or at
least the minimum.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

_NEVER_STATUSES = frozenset((204, 206, 304))
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/(?:\*|\*\+[a-z0-9!#$&^_.+-]+|[a-z0-9!#$&^_.+-]+)")
_QVALUE = re.compile(r"(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)")
DEFAULT_TYPES = (
    "text/*", "application/json", "application/*+json", "application/javascript", "application/xml",
    "application/*+xml", "application/x-ndjson", "image/svg+xml",
)


class MediaTypes:
    """The ``types`` setting, compiled: ``type/subtype``, ``type/*`` and ``type/*+suffix`` entries."""

    __slots__ = ("entries", "_exact", "_any_subtype", "_suffixes")

    def __init__(self, entries: Iterable[str] = DEFAULT_TYPES) -> None:
        self.entries = tuple(entries)
        self._exact = frozenset(entry for entry in self.entries if "*" not in entry)
        self._any_subtype = tuple(entry[:-1] for entry in self.entries if entry.endswith("/*"))
        self._suffixes = tuple(
            (entry.partition("/")[0] + "/", entry.partition("*")[2]) for entry in self.entries if "/*+" in entry
        )

    @classmethod
    def parse(cls, raw: object) -> MediaTypes:
        if not isinstance(raw, list):
            raise ValueError('must be an array of media types, such as ["text/*", "application/json"]')
        for index, entry in enumerate(raw):
            if not isinstance(entry, str) or not _MEDIA_TYPE.fullmatch(entry):
                raise ValueError(f'entry {index} ({entry!r}) is not a lower-case media type: "type/subtype", '
                                 f'"type/*" or "type/*+suffix"')
        return cls(raw)

    def render(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, content_type: str) -> bool:
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type in self._exact or media_type.startswith(self._any_subtype):
            return True
        return any(media_type.startswith(kind) and media_type.endswith(suffix) for kind, suffix in self._suffixes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MediaTypes) and other.entries == self.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"MediaTypes({list(self.entries)!r})"


def compressible(method: str, status: int, headers: Mapping[str, str], types: MediaTypes,
                 min_size: int, length: int | None) -> bool:
    """Whether this response is one to compress (for some client): see the module's docstring."""
    if method == "HEAD" or status < 200 or status in _NEVER_STATUSES:
        return False
    encoding = headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity" or "Content-Range" in headers:
        return False
    content_type = headers.get("Content-Type")
    if content_type is None or content_type not in types:
        return False
    if "no-transform" in headers.get("Cache-Control", "").lower():
        return False
    return length is None or length >= min_size


@functools.lru_cache(maxsize=1024)
def choose_encoding(accept_encoding: str, offered: tuple[str, ...]) -> str | None:
    """The offered coding with the highest q-value (ties: the order of ``offered``), or None.

    A coding the header does not name is acceptable only through ``*``;
    ``x-gzip`` counts as gzip; an explicit ``identity`` q-value above the
    best coding's wins (no compression). Malformed entries are ignored.
    """
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = 1.0
        name, _, value = params.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            if not _QVALUE.fullmatch(value):
                continue
            weight = float(value)
        weights["gzip" if coding == "x-gzip" else coding] = weight
    best, best_weight = None, 0.0
    for coding in offered:
        weight = weights.get(coding, weights.get("*", 0.0))
        if weight > best_weight:
            best, best_weight = coding, weight
    if best is not None and weights.get("identity", 0.0) > best_weight:
        return None
    return best


def weak_etag(etag: str) -> str:
    """The ETag as a weak validator: the compressed bytes differ, the content does not."""
    return etag if etag.startswith("W/") else "W/" + etag
