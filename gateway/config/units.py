"""Durations, sizes and rates as written in the TOML file.

Each type is an immutable value that remembers nothing but its magnitude and
renders back to the shortest exact spelling, so `plugway config show` output
parses back to the same configuration.

    Duration("500ms") == 0.5        seconds, a float
    Size("10MiB") == 10485760       bytes, an int
    Rate("100/m") -> 100 per 60 s   count and period
    Secret({env = "NAME"})          a value read from the environment or a file
"""

from __future__ import annotations

import math
import os
import re

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_NUMBER_WITH_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER_WITH_UNIT.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a {what}")
    return float(match.group(1)), match.group(2)


class Duration(float):
    """A non-negative number of seconds, written "250ms", "30s", "5m", "1h", "1d"."""

    def __new__(cls, value: str | float | int) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a duration")
        if isinstance(value, str):
            number, unit = _split(value, 'duration such as "500ms", "30s" or "5m"')
            if unit not in _DURATION_UNITS:
                raise ValueError(f'{value!r} has an unknown unit; use one of us, ms, s, m, h, d')
            seconds = number * _DURATION_UNITS[unit]
        else:
            seconds = float(value)
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"{value!r} is not a non-negative, finite duration")
        return super().__new__(cls, seconds)

    def __str__(self) -> str:
        for unit, scale in sorted(_DURATION_UNITS.items(), key=lambda item: -item[1]):
            count = float(self) / scale
            if count >= 1 and abs(count - round(count)) < 1e-9:
                return f"{round(count)}{unit}"
        return "0s" if float(self) == 0 else f"{float(self)!r}s"

    __repr__ = __str__


class Size(int):
    """A non-negative number of bytes, written "512B", "64KiB", "10MiB", "1GB"."""

    def __new__(cls, value: str | int) -> Size:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"{value!r} is not a size; write bytes as an integer or a string such as \"10MiB\"")
        if isinstance(value, str):
            number, unit = _split(value, 'size such as "64KiB" or "10MiB"')
            scale = _SIZE_UNITS.get(unit.lower() or "b")
            if scale is None:
                raise ValueError(f"{value!r} has an unknown unit; use B, KiB, MiB, GiB, KB, MB or GB")
            count = number * scale
            if count != int(count):
                raise ValueError(f"{value!r} is not a whole number of bytes")
            value = int(count)
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return super().__new__(cls, value)

    def __str__(self) -> str:
        for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if int(self) >= scale and int(self) % scale == 0:
                return f"{int(self) // scale}{unit}"
        return f"{int(self)}B"

    __repr__ = __str__


class Rate:
    """A count per period, written "100/m", "10/s" or "5/15m"."""

    __slots__ = ("count", "period")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or "/" not in text:
            raise ValueError(f'{text!r} is not a rate such as "100/m" or "5/15m"')
        count_text, period_text = text.split("/", 1)
        if not count_text.strip().isdigit() or int(count_text) <= 0:
            raise ValueError(f"{text!r}: the count must be a positive integer")
        if period_text.strip().isalpha():
            period_text = "1" + period_text.strip()
        period = Duration(period_text)
        if period <= 0:
            raise ValueError(f"{text!r}: the period must be longer than zero")
        self.count = int(count_text)
        self.period = float(period)

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rate) and (self.count, self.period) == (other.count, other.period)

    def __hash__(self) -> int:
        return hash((self.count, self.period))

    def __str__(self) -> str:
        period = str(Duration(self.period))
        return f"{self.count}/{period[1:] if period.startswith('1') and period[1:].isalpha() else period}"

    __repr__ = __str__


class Secret:
    """A secret named in the configuration, never written in it: ``{ env = "NAME" }`` reads
    an environment variable, ``{ file = "/etc/plugway/key.pem" }`` a file (trailing newline
    stripped). It is read when the configuration is loaded (so a missing one is a
    configuration error) and rendered back as where it comes from, never as its value.
    """

    __slots__ = ("source", "name", "value")

    def __init__(self, table: object) -> None:
        if not isinstance(table, dict) or len(table) != 1 or next(iter(table)) not in ("env", "file"):
            raise ValueError('must be { env = "VARIABLE" } or { file = "/path" }: secrets never go in the file itself')
        self.source, self.name = next(iter(table.items()))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"the {self.source} name must be a non-empty string")
        self.value = self._read()

    def _read(self) -> str:
        if self.source == "env":
            value = os.environ.get(self.name)
            if not value:
                raise ValueError(f"the environment variable {self.name} is not set")
            return value
        try:
            with open(self.name, encoding="utf-8") as file:
                return file.read().rstrip("\n")
        except OSError as exc:
            raise ValueError(f"cannot read {self.name}: {exc.strerror}") from None

    def render(self) -> dict[str, str]:
        return {self.source: self.name}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self.source, self.name) == (other.source, other.name)

    def __hash__(self) -> int:
        return hash((self.source, self.name))

    def __repr__(self) -> str:
        return f"Secret({self.source}={self.name!r})"
