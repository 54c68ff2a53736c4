"""Header blocks that stay raw bytes until a plugin asks to edit them.

The data path handles headers as ``(name, value)`` byte pairs, as they came
off the wire. The first time a plugin reads ``.headers`` the block becomes a
``CIMultiDict[str]`` (latin-1, as HTTP/1.1 defines) that the plugin may
change freely; serialising it then refuses any control character a plugin
may have put in, so no plugin can inject a header or split a response.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict

RawHeaders = list[tuple[bytes, bytes]]
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HeaderInjection(ValueError):
    """A plugin tried to send a header name or value that is not allowed on the wire."""


class HeaderBlock:
    __slots__ = ("_raw", "_dict")

    def __init__(self, raw: RawHeaders) -> None:
        self._raw: RawHeaders | None = raw
        self._dict: CIMultiDict[str] | None = None

    @property
    def editable(self) -> CIMultiDict[str]:
        if self._dict is None:
            self._dict = CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw)
            self._raw = None
        return self._dict

    def get(self, name: str) -> str | None:
        if self._dict is not None:
            return self._dict.get(name)
        wanted = name.lower().encode("latin-1")
        for key, value in self._raw:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def add_raw(self, name: bytes, value: bytes) -> None:
        if self._dict is not None:
            self._dict.add(name.decode("latin-1"), value.decode("latin-1"))
        else:
            self._raw.append((name, value))

    def remove(self, lower_names: frozenset[bytes]) -> None:
        if self._dict is not None:
            for name in lower_names:
                self._dict.popall(name.decode("latin-1"), None)
        else:
            self._raw = [(key, value) for key, value in self._raw if key.lower() not in lower_names]

    def serialize(self) -> bytes:
        if self._dict is None:
            return b"".join([name + b": " + value + b"\r\n" for name, value in self._raw])
        parts = []
        for name, value in self._dict.items():
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise HeaderInjection(f"refusing to send the header {name!r}: invalid name or control character")
            parts.append(f"{name}: {value}\r\n")
        try:
            return "".join(parts).encode("latin-1")
        except UnicodeEncodeError:
            raise HeaderInjection("refusing to send a header value that is not latin-1") from None


def add_vary(headers: CIMultiDict[str], name: str) -> None:
    """Add ``name`` to a response's ``Vary`` (folding repeated lines into one), unless it or ``*`` is there."""
    existing = [value for value in headers.getall("Vary", ()) if value.strip()]
    listed = {token.strip().lower() for value in existing for token in value.split(",")}
    if name.lower() not in listed and "*" not in listed:
        headers["Vary"] = ", ".join([*existing, name])
