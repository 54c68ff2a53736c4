"""Sets of IPv4 and IPv6 addresses and CIDR ranges, looked up in O(log n).

The configured ranges are merged, per address family, into sorted disjoint
intervals of integers; a lookup turns the address into an integer with
``socket.inet_pton`` (several times faster than ``ipaddress``) and bisects.
With 10,000 ranges a lookup costs under a microsecond
(``plugins/iprestrict/measure_lookup.py`` prints the figure on this machine).

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) and ranges inside
``::ffff:0:0/96`` count as the IPv4 ones they carry, so one entry covers
both spellings. An address that is not an IP address at all (a unix-socket
peer) is in no set.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Iterable

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MAPPED_NETWORK = ipaddress.IPv6Network("::ffff:0:0/96")


def address_number(address: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer), or None if ``address`` is not an IP address."""
    if ":" in address:
        try:
            packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
        except OSError:
            return None
        if packed[:12] == _MAPPED_PREFIX:
            return 4, int.from_bytes(packed[12:])
        return 6, int.from_bytes(packed)
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address))
    except OSError:
        return None


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    network = ipaddress.ip_network(entry, strict=False)
    if network.version == 6 and network.subnet_of(_MAPPED_NETWORK):
        first = int(network.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((first, network.prefixlen - 96))
    return network


def _merged(networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> tuple[list[int], list[int]]:
    """Sorted starts and ends of the disjoint intervals covering ``networks``."""
    starts: list[int] = []
    ends: list[int] = []
    for first, last in sorted((int(n.network_address), int(n.broadcast_address)) for n in networks):
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends


class AddressSet:
    """Addresses and CIDR ranges, as configured (``entries``) and compiled for lookups."""

    __slots__ = ("entries", "_intervals")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries = tuple(entries)
        by_family: dict[int, list] = {4: [], 6: []}
        for entry in self.entries:
            network = _network(entry)
            by_family[network.version].append(network)
        self._intervals = {family: _merged(networks) for family, networks in by_family.items()}

    @classmethod
    def parse(cls, raw: object) -> AddressSet:
        """From a TOML array of strings; ValueError names the first bad entry."""
        if not isinstance(raw, list):
            raise ValueError("must be an array of addresses and CIDR ranges")
        for index, entry in enumerate(raw):
            if not isinstance(entry, str):
                raise ValueError(f"entry {index} must be a string such as \"10.0.0.0/8\", not {entry!r}")
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"entry {index} ({entry!r}) is not an IPv4/IPv6 address or CIDR range") from None
        return cls(raw)

    def render(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, address: str) -> bool:
        number = address_number(address)
        if number is None:
            return False
        starts, ends = self._intervals[number[0]]
        index = bisect.bisect_right(starts, number[1]) - 1
        return index >= 0 and number[1] <= ends[index]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddressSet) and other.entries == self.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"AddressSet({len(self.entries)} entries)"


def permitted(address: str, allow: AddressSet, deny: AddressSet) -> bool:
    """Deny wins; then, when there is an allow list, only what it holds gets through."""
    if address in deny:
        return False
    return not allow or address in allow
