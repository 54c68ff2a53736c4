"""RFC 9111 for a shared cache: Cache-Control, what may be stored, freshness and age. Pure.

Times are seconds since the epoch (``time.time()``): ``Date`` and ``Expires`` are
wall-clock times, and entries in a shared store are read by other hosts.
"""

from __future__ import annotations

import calendar
import email.utils
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timezone
from typing import Any

MAX_DELTA = 2147483648  # RFC 9111 section 1.2.2: larger delta-seconds are taken as 2^31
_DIGITS = frozenset("0123456789")

# What a lookup decides about a stored response.
HIT = "hit"  # fresh: answer from the cache
STALE = "stale"  # stale, but the client (max-stale) accepts it
STALE_REVALIDATE = "stale_revalidate"  # stale within stale-while-revalidate: answer, refresh in the background
REVALIDATE = "revalidate"  # ask the upstream (conditionally when the entry has a validator)


class CacheControl:
    """The directives of one or more Cache-Control field lines: lower-case name -> argument or None."""

    __slots__ = ("directives", "conflicting")

    def __init__(self, directives: dict[str, str | None], conflicting: frozenset[str] = frozenset()) -> None:
        self.directives = directives
        self.conflicting = conflicting

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def argument(self, name: str) -> str | None:
        return self.directives.get(name)

    def seconds(self, name: str) -> int | None:
        """A delta-seconds argument; None if the directive is absent. An invalid argument, or
        the directive given twice with different values, counts as 0 (RFC 9111 section 4.2.1:
        such a response is treated as stale)."""
        if name not in self.directives:
            return None
        argument = self.directives[name]
        if name in self.conflicting or not argument or not _DIGITS.issuperset(argument):
            return 0
        return min(int(argument), MAX_DELTA)

    def fields(self, name: str) -> tuple[str, ...]:
        """The header names of a qualified form such as ``private="Set-Cookie"`` (lower case)."""
        argument = self.directives.get(name)
        if not argument:
            return ()
        return tuple(field.strip().lower() for field in argument.split(",") if field.strip())

    def unqualified(self, name: str) -> bool:
        return name in self.directives and not self.directives[name]


def parse_cache_control(values: Iterable[str]) -> CacheControl:
    directives: dict[str, str | None] = {}
    conflicting = set()
    for value in values:
        for name, argument in _directives(value):
            if name in directives and directives[name] != argument:
                conflicting.add(name)
            else:
                directives[name] = argument
    return CacheControl(directives, frozenset(conflicting))


def _directives(value: str) -> Iterable[tuple[str, str | None]]:
    """``name[=token|"quoted, string"]`` items separated by commas."""
    index, end = 0, len(value)
    while index < end:
        while index < end and value[index] in " \t,":
            index += 1
        start = index
        while index < end and value[index] not in "=,":
            index += 1
        name = value[start:index].strip().lower()
        argument = None
        if index < end and value[index] == "=":
            index += 1
            while index < end and value[index] in " \t":
                index += 1
            if index < end and value[index] == '"':
                index += 1
                chars = []
                while index < end and value[index] != '"':
                    if value[index] == "\\" and index + 1 < end:
                        index += 1
                    chars.append(value[index])
                    index += 1
                argument = "".join(chars)
                while index < end and value[index] != ",":
                    index += 1
            else:
                start = index
                while index < end and value[index] != ",":
                    index += 1
                argument = value[start:index].strip()
        if name:
            yield name, argument


_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def http_date(text: str | None) -> float | None:
    """An HTTP date (IMF-fixdate, RFC 850 or asctime) as epoch seconds, or None if invalid."""
    if not text:
        return None
    text = text.strip()
    if len(text) == 29 and text[3:5] == ", " and text[25:] == " GMT" and text[8:11] in _MONTHS:
        try:  # IMF-fixdate, what every current server sends: ten times faster than email.utils
            fields = (int(text[12:16]), _MONTHS[text[8:11]], int(text[5:7]), int(text[17:19]), int(text[20:22]),
                      int(text[23:25]))
        except ValueError:
            return None
        if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
            return None
        return float(calendar.timegm(fields))
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def format_http_date(seconds: float) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


# --- freshness (RFC 9111 section 4.2) ---------------------------------------------------------------


def explicit_lifetime(cc: CacheControl, expires: list[str], date: float | None, response_time: float) -> float | None:
    """The lifetime the upstream gave: s-maxage, else max-age, else Expires minus Date; None if none."""
    for name in ("s-maxage", "max-age"):
        seconds = cc.seconds(name)
        if seconds is not None:
            return float(seconds)
    if not expires:
        return None
    if len(set(expires)) > 1:
        return 0.0  # two different Expires lines: stale
    expiry = http_date(expires[0])
    if expiry is None:
        return 0.0  # an invalid date (such as "0") means already expired
    return max(0.0, expiry - (date if date is not None else response_time))


def initial_age(age_header: str | None, date: float | None, request_time: float, response_time: float) -> float:
    """The corrected initial age of a response (RFC 9111 section 4.2.3)."""
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_value = 0
    if age_header:
        first = age_header.split(",")[0].strip()
        if first and _DIGITS.issuperset(first):
            age_value = min(int(first), MAX_DELTA)
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    return max(apparent_age, corrected_age_value)


@dataclass(frozen=True)
class StaleRules:
    """How long past its lifetime a response may still be served, and whether it may at all."""

    while_revalidate: float
    if_error: float
    must_revalidate: bool


def stale_rules(cc: CacheControl, default_while_revalidate: float, default_if_error: float) -> StaleRules:
    """The upstream's stale-while-revalidate / stale-if-error (RFC 5861), else the configured ones.

    ``must-revalidate`` and ``proxy-revalidate`` forbid serving stale at all. ``s-maxage``
    implies proxy-revalidate for a shared cache: the configured defaults then do not apply,
    but stale-* directives the upstream sent explicitly still do.
    """
    if "must-revalidate" in cc or "proxy-revalidate" in cc:
        return StaleRules(0.0, 0.0, True)
    implied = "s-maxage" in cc
    values = []
    for name, default in (("stale-while-revalidate", default_while_revalidate), ("stale-if-error", default_if_error)):
        explicit = cc.seconds(name)
        values.append(float(explicit) if explicit is not None else 0.0 if implied else float(default))
    return StaleRules(values[0], values[1], False)


# --- what may be stored (RFC 9111 section 3) -----------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether a response may be stored; ``intrinsic`` when the response itself forbids it
    (not this particular request), so that later requests need not wait for the next one."""

    store: bool
    reason: str = ""
    intrinsic: bool = False


STORE = Verdict(True)


def storability(
    status: int, cc: CacheControl, lifetime: float | None, *, has_validator: bool, has_set_cookie: bool,
    vary_star: bool, authorized: bool, request_no_store: bool, settings: Any,
) -> Verdict:
    """``settings`` gives ``statuses``, ``allow_set_cookie`` and ``authorization``."""
    if request_no_store:
        return Verdict(False, "the request said no-store")
    if status not in settings.statuses:  # a server error says nothing lasting about the resource
        return Verdict(False, f"status {status} is not cached", status < 500)
    if "no-store" in cc and "must-understand" not in cc:
        return Verdict(False, "no-store", True)  # must-understand: the status is one we know how to cache
    if cc.unqualified("private"):
        return Verdict(False, "private", True)
    if vary_star:
        return Verdict(False, "Vary: *", True)
    if has_set_cookie and not settings.allow_set_cookie:
        return Verdict(False, "Set-Cookie", True)
    if authorized and settings.authorization == "rfc" and not shareable_with_authorization(cc):
        return Verdict(False, "a request with Authorization, and no public, s-maxage or must-revalidate")
    if cc.unqualified("no-cache"):  # revalidated before every use: its lifetime does not matter
        return STORE if has_validator else Verdict(False, "no-cache without a validator", True)
    if lifetime is None:
        return Verdict(False, "no freshness information (and no default_ttl for this status)", True)
    return STORE


def shareable_with_authorization(cc: CacheControl) -> bool:
    """RFC 9111 section 3.5: a response to a request with Authorization may be reused by a shared cache."""
    return "public" in cc or "s-maxage" in cc or "must-revalidate" in cc


def unstored_fields(cc: CacheControl) -> frozenset[str]:
    """Header fields a shared cache must not store or reuse unvalidated: ``private="..."`` and
    ``no-cache="..."`` (RFC 9111 sections 5.2.2.4 and 5.2.2.7)."""
    return frozenset(cc.fields("private")) | frozenset(cc.fields("no-cache"))


# --- serving a stored response (RFC 9111 section 4) ------------------------------------------------------


def evaluate(age: float, lifetime: float, *, no_cache: bool, rules: StaleRules, request: CacheControl | None) -> str:
    """HIT, STALE, STALE_REVALIDATE or REVALIDATE for a stored response of ``age`` seconds."""
    if no_cache:
        return REVALIDATE
    min_fresh = 0
    if request is not None:
        if "no-cache" in request:
            return REVALIDATE
        max_age = request.seconds("max-age")
        if max_age is not None and age > max_age:
            return REVALIDATE
        min_fresh = request.seconds("min-fresh") or 0
    if lifetime - age > min_fresh:
        return HIT
    if rules.must_revalidate or lifetime > age:  # (fresh, but not for min-fresh more seconds)
        return REVALIDATE
    staleness = age - lifetime
    if request is not None and "max-stale" in request:
        limit = request.argument("max-stale")
        if not limit or staleness <= (request.seconds("max-stale") or 0):
            return STALE
    if staleness < rules.while_revalidate:
        return STALE_REVALIDATE
    return REVALIDATE
