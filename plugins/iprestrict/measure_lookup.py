"""Print what one iprestrict lookup costs with many ranges, next to a linear scan with ipaddress.

    .venv/bin/python plugins/iprestrict/measure_lookup.py [--ranges 10000] [--lookups 200000]

Ranges are random IPv4 and IPv6 CIDR blocks (a fixed seed); lookups mix addresses inside them,
addresses outside, and IPv6 ones. This is a measurement to read, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import time

from plugway_iprestrict.addresses import AddressSet


def random_ranges(count: int, rng: random.Random) -> list[str]:
    ranges = []
    for index in range(count):
        if index % 4 == 3:
            prefix = rng.randint(32, 64)
            network = ipaddress.IPv6Network((rng.getrandbits(128), prefix), strict=False)
        else:
            prefix = rng.randint(16, 32)
            network = ipaddress.IPv4Network((rng.getrandbits(32), prefix), strict=False)
        ranges.append(str(network))
    return ranges


def sample_addresses(ranges: list[str], count: int, rng: random.Random) -> list[str]:
    addresses = []
    for index in range(count):
        if index % 2:
            network = ipaddress.ip_network(rng.choice(ranges))
            offset = rng.randrange(network.num_addresses)
            addresses.append(str(network.network_address + offset))
        elif index % 4 == 0:
            addresses.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            addresses.append(str(ipaddress.IPv6Address(rng.getrandbits(128))))
    return addresses


def microseconds_per_call(function, addresses: list[str]) -> float:
    started = time.perf_counter()
    for address in addresses:
        function(address)
    return (time.perf_counter() - started) / len(addresses) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranges", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(2100)
    ranges = random_ranges(args.ranges, rng)
    addresses = sample_addresses(ranges, args.lookups, rng)

    started = time.perf_counter()
    address_set = AddressSet(ranges)
    compile_ms = (time.perf_counter() - started) * 1e3
    hits = sum(address in address_set for address in addresses)
    best = min(microseconds_per_call(address_set.__contains__, addresses) for _ in range(5))

    networks = [ipaddress.ip_network(entry) for entry in ranges]
    naive_sample = addresses[:200]
    naive = microseconds_per_call(lambda a: any(ipaddress.ip_address(a) in n for n in networks), naive_sample)

    print(f"{args.ranges} ranges compiled in {compile_ms:.0f} ms; {args.lookups} lookups, {hits} inside a range")
    print(f"iprestrict lookup: {best:.2f} us per address (best of 5 passes)")
    print(f"linear scan with ipaddress, for comparison: {naive:.0f} us per address")


if __name__ == "__main__":
    main()
