"""Rule path patterns, matched against the whole canonical path (``ctx.path``).

A pattern is a canonical path whose segments may be:

- a literal (``tasks``), compared byte for byte with the canonical segment;
- ``*``: exactly one segment;
- ``**``: any number of segments, zero included (``/api/tasks/**`` matches
  ``/api/tasks``, ``/api/tasks/`` and ``/api/tasks/1/notes``, never ``/api/tasksX``);
  at most one per pattern, so that matching stays linear in the path's length;
- ``{name}``: exactly one segment, captured; its value is decoded as the core
  decodes ``ctx.path_params`` (``%20`` becomes a space).

A pattern that does not end with ``/`` or ``**`` also matches the same path
with one trailing slash: ``/admin`` matches ``/admin/``, so that a later, wider
rule can never catch ``/admin/`` instead of the rule written for ``/admin``.

Literals may not hold percent-escapes, dot segments, empty segments or
characters a canonical path cannot have: an escape has several spellings in a
request (``%C3%A9``, ``%c3%a9``), so a literal could miss one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.paths import PLACEHOLDER

_LITERAL = re.compile(r"[A-Za-z0-9\-._~!$&'()+,=:@]+")


@dataclass(frozen=True)
class PathPattern:
    """One compiled pattern: ``match(path)`` returns the match or None; ``names`` its placeholders.

    ``source(prefix)`` is the regular expression with every placeholder group renamed
    ``prefix + name``, so that several patterns can be joined into one alternation.
    """

    text: str
    regex: re.Pattern[str] = field(compare=False, repr=False)
    names: tuple[str, ...] = field(compare=False, default=())

    @classmethod
    def parse(cls, raw: object) -> PathPattern:
        """For ``setting(parse=...)``: the compiled pattern, or ValueError with the reason."""
        if not isinstance(raw, str):
            raise ValueError(f"must be a string such as \"/api/tasks/**\", not {raw!r}")
        source, names = _source(raw, "")
        return cls(raw, re.compile(source), names)

    def __str__(self) -> str:
        return self.text

    def match(self, path: str) -> re.Match[str] | None:
        return self.regex.fullmatch(path)

    def source(self, prefix: str) -> str:
        return _source(self.text, prefix)[0]


def _source(text: str, prefix: str) -> tuple[str, tuple[str, ...]]:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must start with /")
    segments = text.split("/")[1:]
    if segments.count("**") > 1:
        # Two would make a failing match cost the square of the path's segment count.
        raise ValueError(f"{text!r} has ** twice; a pattern may have one")
    names: list[str] = []
    parts: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "":
            if index != last:
                raise ValueError(f"{text!r} has an empty segment (//); the path it is matched with never has one")
            parts.append("/")
        elif segment == "**":
            parts.append("(?:/.*)?" if index == last else "(?:/[^/]+)*")
        elif segment == "*":
            parts.append("/[^/]+")
        elif PLACEHOLDER.fullmatch(segment):
            name = segment[1:-1]
            if name in names:
                raise ValueError(f"{text!r} uses the placeholder {{{name}}} twice")
            names.append(name)
            parts.append(f"/(?P<{prefix}{name}>[^/]+)")
        elif segment in (".", ".."):
            raise ValueError(f"{text!r} has a dot segment; the path it is matched with never has one")
        elif not _LITERAL.fullmatch(segment):
            raise ValueError(
                f"{text!r}: the segment {segment!r} must be *, **, {{name}} or plain characters "
                "(no percent-escape, *, {, }, ; or whitespace inside a segment)"
            )
        else:
            parts.append("/" + re.escape(segment))
    if segments[-1] not in ("", "**"):
        parts.append("/?")
    return "".join(parts), tuple(names)
