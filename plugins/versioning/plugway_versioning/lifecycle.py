"""A version's lifecycle: when it is deprecated and retired, and the response headers that say so.

- ``Deprecation`` (RFC 9745) is a structured-field date: ``@`` and Unix seconds.
- ``Sunset`` (RFC 8594) is an HTTP-date (IMF-fixdate).
- ``Link`` carries ``rel="deprecation"`` and ``rel="sunset"`` to human-readable pages.

Dates come from the configuration as TOML date-times (with an offset), TOML
dates (midnight UTC) or RFC 3339 strings, and are compared with the current
time on each request, so a version retires on time without a reload.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from email.utils import format_datetime
from typing import Any

_LINK_TARGET = re.compile(r"[^\x00-\x20<>\x7f]+")


def parse_instant(raw: Any) -> datetime:
    """A time-zone-aware datetime from a TOML date-time, a TOML date or an RFC 3339 string."""
    if isinstance(raw, str):
        try:
            value = datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(f'{raw!r} is not an RFC 3339 date-time such as "2026-01-31T00:00:00Z"') from None
        if value.tzinfo is None and len(raw) == 10:
            return value.replace(tzinfo=timezone.utc)  # a bare date: midnight UTC
        raw = value
    if isinstance(raw, datetime):
        if raw.tzinfo is None:
            raise ValueError(f"{raw.isoformat()} needs a time zone offset, as 2026-01-31T00:00:00Z")
        return raw
    if isinstance(raw, date):
        return datetime(raw.year, raw.month, raw.day, tzinfo=timezone.utc)
    raise ValueError(f"must be a date-time such as 2026-01-31T00:00:00Z, not {type(raw).__name__}")


def parse_link(raw: Any) -> str:
    """A URI for a Link header: anything without spaces, controls, '<' or '>'."""
    if not isinstance(raw, str) or not _LINK_TARGET.fullmatch(raw):
        raise ValueError(f"{raw!r} is not a URI usable in a Link header")
    return raw


def announcement(
    deprecated_at: datetime | None, sunset_at: datetime | None,
    deprecation_link: str | None, sunset_link: str | None,
) -> tuple[tuple[str, str], ...]:
    """The response headers that announce a version's deprecation and sunset (empty if neither)."""
    headers = []
    if deprecated_at is not None:
        headers.append(("Deprecation", f"@{int(deprecated_at.timestamp())}"))
    if sunset_at is not None:
        headers.append(("Sunset", http_date(sunset_at)))
    if deprecation_link is not None:
        headers.append(("Link", f'<{deprecation_link}>; rel="deprecation"; type="text/html"'))
    if sunset_link is not None:
        headers.append(("Link", f'<{sunset_link}>; rel="sunset"; type="text/html"'))
    return tuple(headers)


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(timezone.utc), usegmt=True)


def retired(sunset_at: datetime | None, now: datetime) -> bool:
    return sunset_at is not None and now >= sunset_at
