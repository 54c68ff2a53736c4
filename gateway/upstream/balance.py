"""Load-balancing algorithms: pure choices over a list of targets, no I/O.

A target is anything with ``weight`` (int) and ``in_flight`` (int, requests
this worker has open on it). Every balancer picks among the targets it is
given, skipping those in ``exclude`` (targets already tried for a request).

- ``SmoothWeightedRoundRobin``: nginx's algorithm; weights 2:1 give A A B
  interleaved as A B A, never bursts.
- ``LeastConnections``: fewest in-flight requests relative to weight; ties
  go round robin so equal targets share the load.
- ``PowerOfTwoChoices``: two distinct targets drawn at random (by weight),
  the one with fewer in-flight requests relative to weight wins.
- ``ConsistentHash``: a ring of virtual nodes (160 per unit of weight, as in
  ketama); a key keeps its target while the target set is unchanged, and
  adding one of N targets moves about 1/N of the keys. Requests without a
  key fall back to round robin.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Weighted(Protocol):
    weight: int
    in_flight: int


T = TypeVar("T", bound=Weighted)
VIRTUAL_NODES_PER_WEIGHT = 160


class SmoothWeightedRoundRobin:
    def __init__(self, targets: Sequence[T]) -> None:
        self.targets = list(targets)
        self._current = [0] * len(self.targets)

    def pick(self, key: str | None = None, exclude: frozenset = frozenset()) -> T | None:
        best = -1
        total = 0
        current = self._current
        for index, target in enumerate(self.targets):
            if target in exclude:
                continue
            current[index] += target.weight
            total += target.weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return None
        current[best] -= total
        return self.targets[best]


class LeastConnections:
    def __init__(self, targets: Sequence[T]) -> None:
        self.targets = list(targets)
        self._next = 0

    def pick(self, key: str | None = None, exclude: frozenset = frozenset()) -> T | None:
        count = len(self.targets)
        start = self._next
        self._next = (start + 1) % count
        best = None
        for offset in range(count):
            target = self.targets[(start + offset) % count]
            if target in exclude:
                continue
            if best is None or target.in_flight * best.weight < best.in_flight * target.weight:
                best = target
        return best


class PowerOfTwoChoices:
    def __init__(self, targets: Sequence[T], rng: random.Random | None = None) -> None:
        self.targets = list(targets)
        self._rng = rng or random.Random()

    def pick(self, key: str | None = None, exclude: frozenset = frozenset()) -> T | None:
        candidates = [target for target in self.targets if target not in exclude] if exclude else self.targets
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = self._two_distinct(candidates)
        if second.in_flight * first.weight < first.in_flight * second.weight:
            return second
        return first

    def _two_distinct(self, candidates: list[T]) -> tuple[T, T]:
        weights = [target.weight for target in candidates]
        first = self._rng.choices(candidates, weights)[0]
        rest = [target for target in candidates if target is not first]
        second = self._rng.choices(rest, [target.weight for target in rest])[0]
        return first, second


class ConsistentHash:
    def __init__(self, targets: Sequence[T], names: Sequence[str]) -> None:
        """``names`` identify the targets stably (their URLs), so the ring survives restarts."""
        self.targets = list(targets)
        ring: list[tuple[int, int]] = []
        for index, (target, name) in enumerate(zip(self.targets, names)):
            for replica in range(VIRTUAL_NODES_PER_WEIGHT * target.weight):
                ring.append((_hash(f"{name}#{replica}"), index))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]
        self._fallback = SmoothWeightedRoundRobin(self.targets)

    def pick(self, key: str | None = None, exclude: frozenset = frozenset()) -> T | None:
        if key is None:
            return self._fallback.pick(None, exclude)
        position = bisect.bisect(self._points, _hash(key))
        size = len(self._points)
        seen: set[int] = set()
        for step in range(size):
            owner = self._owners[(position + step) % size]
            if owner in seen:
                continue
            target = self.targets[owner]
            if target not in exclude:
                return target
            seen.add(owner)
            if len(seen) == len(self.targets):
                break
        return None


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def make_balancer(algorithm: str, targets: Sequence[T], names: Sequence[str]):
    if algorithm == "hash":
        return ConsistentHash(targets, names)
    return {"round_robin": SmoothWeightedRoundRobin, "least_conn": LeastConnections, "p2c": PowerOfTwoChoices}[
        algorithm
    ](targets)
