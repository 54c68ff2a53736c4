"""A raw query string edited like a multi-valued mapping, keeping the bytes of what it does not touch.

``QueryString`` offers the part of ``CIMultiDict``'s interface that rules use
(``popall``, ``add``, item assignment, ``in``), so header and query edits are
one piece of code. Names are compared decoded; values added here are
percent-encoded (every reserved character, so a value can never add a
parameter or end the query).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote_plus


class QueryString:
    """The parameters of one query, in order: (decoded name, raw "name=value" text)."""

    __slots__ = ("pairs",)

    def __init__(self, raw: str) -> None:
        self.pairs: list[tuple[str, str]] = [
            (unquote_plus(part.partition("=")[0]), part) for part in raw.split("&") if part
        ]

    def __contains__(self, name: object) -> bool:
        return any(key == name for key, _ in self.pairs)

    def popall(self, name: str, default: Any = None) -> list[str] | Any:
        """The decoded values of ``name``, removed from the query; ``default`` if it has none."""
        values = [unquote_plus(raw.partition("=")[2]) for key, raw in self.pairs if key == name]
        self.pairs = [(key, raw) for key, raw in self.pairs if key != name]
        return values or default

    def add(self, name: str, value: str) -> None:
        self.pairs.append((name, f"{quote(name, safe='')}={quote(value, safe='')}"))

    def __setitem__(self, name: str, value: str) -> None:
        self.popall(name)
        self.add(name, value)

    def __str__(self) -> str:
        return "&".join(raw for _, raw in self.pairs)
