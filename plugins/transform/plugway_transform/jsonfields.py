"""JSON document fields named by dotted paths: ``user.name``, ``items.0.id``, ``items.*.name``.

A segment is an object key, or an array index when it is all digits and
the container is an array; ``*`` stands for every element of an array (or
every value of an object). Keys that contain a dot cannot be named.

The operations edit the document in place and say whether they changed it;
a path that does not lead anywhere (a missing key, a scalar on the way) is
left alone rather than treated as an error. ``set`` creates missing objects
on the way; ``rename`` moves a value, also across levels
(``name`` -> ``profile.full_name``), and with ``*`` within each element.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

WILDCARD = "*"
_MISSING = object()


class FieldPathError(ValueError):
    pass


@dataclass(frozen=True)
class FieldPath:
    segments: tuple[str, ...]

    @property
    def last_wildcard(self) -> int:
        """Index of the last ``*`` segment, or -1."""
        for index in range(len(self.segments) - 1, -1, -1):
            if self.segments[index] == WILDCARD:
                return index
        return -1


def parse_field_path(text: str, *, wildcard_last: bool = True) -> FieldPath:
    segments = tuple(text.split("."))
    if not text or any(not segment for segment in segments):
        raise FieldPathError(f"{text!r} is not a dotted field path such as user.name or items.*.id")
    if not wildcard_last and segments[-1] == WILDCARD:
        raise FieldPathError(f"{text!r}: the last segment cannot be {WILDCARD}")
    return FieldPath(segments)


def check_rename(old: FieldPath, new: FieldPath) -> None:
    """A rename with ``*`` must keep everything up to the last ``*``: it renames within each element."""
    cut = max(old.last_wildcard, new.last_wildcard)
    if cut >= 0 and old.segments[:cut + 1] != new.segments[:cut + 1]:
        raise FieldPathError(
            f"{'.'.join(old.segments)!r} -> {'.'.join(new.segments)!r}: both must be the same up to the last *"
        )
    if cut + 1 >= min(len(old.segments), len(new.segments)):
        raise FieldPathError(f"{'.'.join(old.segments)!r}: a rename needs a field after the last *")


def remove_field(document: Any, path: FieldPath) -> bool:
    changed = False
    for parent in _reach(document, path.segments[:-1]):
        changed |= _delete(parent, path.segments[-1])
    return changed


def set_field(document: Any, path: FieldPath, make_value: Callable[[], Any]) -> bool:
    """Set the field to ``make_value()`` (called once per place; a None return skips it)."""
    cut = path.last_wildcard + 1
    changed = False
    for base in _reach(document, path.segments[:cut]):
        value = make_value()
        if value is not None:
            changed |= _put(base, path.segments[cut:], value)
    return changed


def rename_field(document: Any, old: FieldPath, new: FieldPath) -> bool:
    cut = max(old.last_wildcard, new.last_wildcard) + 1
    changed = False
    for base in _reach(document, old.segments[:cut]):
        value = _take(base, old.segments[cut:])
        if value is not _MISSING:
            _put(base, new.segments[cut:], value)
            changed = True
    return changed


def _reach(node: Any, segments: tuple[str, ...]) -> Iterator[Any]:
    """Every container that ``segments`` lead to from ``node``."""
    if not segments:
        if isinstance(node, (dict, list)):
            yield node
        return
    head, rest = segments[0], segments[1:]
    if head == WILDCARD:
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in list(children):
            yield from _reach(child, rest)
        return
    child = _child(node, head)
    if child is not _MISSING:
        yield from _reach(child, rest)


def _child(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key, _MISSING)
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    return _MISSING


def _delete(node: Any, key: str) -> bool:
    if key == WILDCARD:
        had = bool(node)
        node.clear()
        return had
    if isinstance(node, dict):
        return node.pop(key, _MISSING) is not _MISSING
    if key.isdigit() and int(key) < len(node):
        del node[int(key)]
        return True
    return False


def _take(node: Any, segments: tuple[str, ...]) -> Any:
    for parent in _reach(node, segments[:-1]):
        value = _child(parent, segments[-1])
        if value is not _MISSING:
            _delete(parent, segments[-1])
        return value
    return _MISSING


def _put(node: Any, segments: tuple[str, ...], value: Any) -> bool:
    for key in segments[:-1]:
        child = _child(node, key)
        if child is _MISSING and isinstance(node, dict):
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            return False
        node = child
    last = segments[-1]
    if isinstance(node, dict):
        node[last] = value
        return True
    if last.isdigit() and int(last) < len(node):
        node[int(last)] = value
        return True
    return False
