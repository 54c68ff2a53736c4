"""One canonical form of the request path, used by routing, plugins and the upstream.

The rule (RFC 3986 sections 6.2.2 and 5.2.4, as settled in DECISIONS.md):

- percent-encoded unreserved characters (ALPHA, DIGIT, ``-``, ``.``, ``_``,
  ``~``) are decoded: ``%61`` is ``a``, ``%2e`` is ``.``;
- dot segments are removed and repeated slashes merged;
- every other escape (``%20``, ``%C3%A9``, ``%3F``) stays as the client sent it,
  so a path that needs none of the above reaches the upstream byte for byte.

What would stay ambiguous is refused with :class:`BadPath` (400): an encoded
slash or backslash (unless the route keeps them encoded, in which case they
are forwarded as sent and never decoded for routing), a literal backslash, an
escape of a control character, a malformed escape, invalid UTF-8 once
decoded, ``%25`` followed by an encoded dot, slash or backslash (double
encoding), ``;`` or ``%3b`` in a segment (unless the route allows it: Tomcat
and Jetty read ``/..;/`` and ``/..%3b/`` as ``/../``), a segment ending with a
dot (Windows servers drop it, so ``/admin.`` would be ``/admin`` there), a
fragment, any byte outside printable ASCII, and a path that climbs above the
root.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_SLOW_PATH = re.compile(r"[%\\;#]|//|/\.|\.(?:/|$)|[^\x21-\x7e]")
_DOUBLE_ENCODED = re.compile(r"%25(2e|2f|5c)", re.IGNORECASE)
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class BadPath(ValueError):
    """The request path is ambiguous or hostile; ``reason`` says which rule it broke.

    ``route_may_allow`` is true for the refusals a route can opt out of (an
    encoded slash or backslash, a ';' parameter).
    """

    def __init__(self, reason: str, route_may_allow: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.route_may_allow = route_may_allow


def canonical_path(path: str, *, keep_encoded_slash: bool = False, allow_semicolon: bool = False) -> str:
    """The canonical form of ``path`` (no query), or :class:`BadPath`."""
    if not path.startswith("/"):
        raise BadPath("the path must start with /")
    if _SLOW_PATH.search(path) is None:
        return path
    for char in path:
        if not "\x21" <= char <= "\x7e":
            raise BadPath("the path has a character that must be percent-encoded")
    if "\\" in path:
        raise BadPath("the path has a backslash")
    if "#" in path:
        raise BadPath("the request target has a fragment")
    segments: list[str] = []
    raw_segments = path.split("/")[1:]
    trailing_slash = False
    for raw in raw_segments:
        segment = _canonical_segment(raw, keep_encoded_slash, allow_semicolon)
        if segment.endswith(".") and segment not in (".", ".."):
            raise BadPath("a path segment ends with a dot")
        trailing_slash = segment in ("", ".", "..")
        if segment == "..":
            if not segments:
                raise BadPath("the path climbs above the root")
            segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    joined = "/" + "/".join(segments)
    return joined + "/" if trailing_slash and segments else joined


def _canonical_segment(raw: str, keep_encoded_slash: bool, allow_semicolon: bool) -> str:
    if ";" in raw and not allow_semicolon:
        raise BadPath("the path has a ';' parameter", route_may_allow=True)
    if "%" not in raw:
        return raw
    out: list[str] = []
    decoded = bytearray()
    index = 0
    while index < len(raw):
        char = raw[index]
        if char != "%":
            out.append(char)
            decoded.append(ord(char))
            index += 1
            continue
        escape = raw[index + 1:index + 3]
        if len(escape) != 2 or not set(escape) <= _HEX:
            raise BadPath("the path has a malformed percent escape")
        byte = int(escape, 16)
        if byte < 0x20 or byte == 0x7F:
            raise BadPath("the path has an encoded control character")
        if byte in (0x2F, 0x5C) and not keep_encoded_slash:
            raise BadPath("the path has an encoded slash or backslash", route_may_allow=True)
        if byte == 0x3B and not allow_semicolon:
            raise BadPath("the path has a ';' parameter", route_may_allow=True)
        out.append(chr(byte) if byte in _UNRESERVED else raw[index:index + 3])
        decoded.append(byte)
        index += 3
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the path is not valid UTF-8 once decoded") from None
    segment = "".join(out)
    # Checked on the result, so that "%25%32e" (which becomes "%252e") is caught too (found by scripts/fuzz).
    if "%25" in segment and _DOUBLE_ENCODED.search(segment):
        raise BadPath("the path has a double-encoded dot, slash or backslash")
    return segment


def decode_segment(segment: str) -> str:
    """A canonical segment with its remaining escapes decoded (for path parameters)."""
    return unquote(segment, errors="strict") if "%" in segment else segment


def template_error(template: str) -> str | None:
    """Why a route path template such as "/users/{id}" is invalid, or None."""
    names = PLACEHOLDER.findall(template)
    if len(names) != len(set(names)):
        return "a placeholder name is used twice"
    for segment in template.split("/"):
        if ("{" in segment or "}" in segment) and not PLACEHOLDER.fullmatch(segment):
            return "a placeholder must be a whole segment, as /users/{id}"
    try:
        canonical_path(PLACEHOLDER.sub("x", template))
    except BadPath as exc:
        return exc.reason
    return None
