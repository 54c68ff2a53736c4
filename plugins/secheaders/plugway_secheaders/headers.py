"""Which security headers a response gets, checked once at configuration time and applied per response.

Values are validated where a typo would silently weaken the header (a
``Referrer-Policy`` token browsers ignore, an HSTS value without
``max-age``); free-form policies (CSP, Permissions-Policy) are only checked
for characters that cannot go on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HSTS = re.compile(r"max-age=(\d+)((?:\s*;\s*(?:includeSubDomains|preload))*)\s*", re.IGNORECASE)
REFERRER_POLICIES = frozenset({
    "no-referrer", "no-referrer-when-downgrade", "origin", "origin-when-cross-origin", "same-origin",
    "strict-origin", "strict-origin-when-cross-origin", "unsafe-url",
})
# Headers no setting may add or remove: the gateway frames every message itself.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer", "te"})
HSTS = "Strict-Transport-Security"


class HeaderPolicy:
    """The headers to remove and add on one route; HSTS only on responses to TLS requests."""

    __slots__ = ("remove", "plain", "secure", "override")

    def __init__(self, added: Iterable[tuple[str, str]], remove: Iterable[str], override: bool) -> None:
        added = [(name, value) for name, value in added if value]
        self.remove = tuple(remove)
        self.secure = tuple(added)
        self.plain = tuple((name, value) for name, value in added if name != HSTS)
        self.override = override

    def apply(self, headers: MutableMapping[str, str], tls: bool) -> None:
        for name in self.remove:
            headers.popall(name, None)
        for name, value in self.secure if tls else self.plain:
            if self.override or name not in headers:
                headers[name] = value


def hsts_problem(value: str) -> str | None:
    match = _HSTS.fullmatch(value)
    if match is None:
        return 'must be "max-age=SECONDS", optionally with "; includeSubDomains" and "; preload"'
    directives = match.group(2).lower()
    if "preload" in directives and ("includesubdomains" not in directives or int(match.group(1)) < 31536000):
        return "preload requires includeSubDomains and a max-age of at least 31536000 (one year)"
    return None


def referrer_problem(value: str) -> str | None:
    unknown = [token for token in (t.strip() for t in value.split(",")) if token not in REFERRER_POLICIES]
    return f"{unknown[0]!r} is not a Referrer-Policy value" if unknown else None


def problems(
    values: Mapping[str, str], dedicated: Iterable[str], extra: Mapping[str, str], remove: Iterable[str],
) -> Iterator[tuple[str, str]]:
    """(setting, reason) for every value that cannot be sent or would not work.

    ``values`` are the dedicated settings by setting name, ``dedicated`` their header names.
    """
    for key, value in [*values.items(), *(("headers", v) for v in extra.values())]:
        if _CONTROL.search(value):
            yield key, "must not contain control characters"
    checks = {
        "strict_transport_security": hsts_problem,
        "referrer_policy": referrer_problem,
        "x_frame_options": lambda v: None if v.upper() in ("DENY", "SAMEORIGIN") else 'must be "DENY" or "SAMEORIGIN"',
        "x_content_type_options": lambda v: None if v.lower() == "nosniff" else 'must be "nosniff"',
    }
    for key, check in checks.items():
        problem = values[key] and check(values[key])
        if problem:
            yield key, problem
    for key, names in (("headers", extra), ("remove", remove)):
        for name in names:
            if not TOKEN.fullmatch(name):
                yield key, f"{name!r} is not a header name"
            elif name.lower() in FRAMING:
                yield key, f"{name} belongs to the gateway's framing and cannot be changed here"
    own = {name.lower() for name in dedicated}
    for name in extra:
        if name.lower() in own:
            yield "headers", f"{name} has its own setting: use it instead"
