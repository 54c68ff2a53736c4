"""Request collapsing: concurrent misses for one key send one request upstream.

In a worker, the first miss for a key becomes the leader (a future per key) and later ones
wait on that future. With the shared store, the worker's leader also takes a lock in the
store (``add``: the first writer wins); a leader that loses it waits for the other
worker's (or host's) entry by polling the store, and then wakes its own followers. Every
wait is bounded by the route's ``collapse_timeout``: a request that waited that long goes
upstream itself.
"""

from __future__ import annotations

import asyncio
import time
from enum import Enum

POLL_FIRST = 0.005  # seconds between polls of the shared store, doubling up to POLL_MAX
POLL_MAX = 0.05


class Outcome(Enum):
    LEAD = "lead"  # go upstream and store the answer, then land
    WAITED = "waited"  # another request fetched it: look again
    TIMEOUT = "timeout"  # waited in vain: go upstream without leading


class Flights:
    """The keys being fetched by this worker, each with the future its followers wait on."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future] = {}
        self.waiting = 0

    def __contains__(self, key: str) -> bool:
        return key in self._flights

    def take_off(self, key: str) -> None:
        self._flights[key] = asyncio.get_running_loop().create_future()

    async def follow(self, key: str, timeout: float) -> bool:
        """Wait for the flight of ``key`` to land; False if it did not within ``timeout``."""
        future = self._flights[key]
        self.waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1

    def land(self, key: str) -> None:
        future = self._flights.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)


async def wait_for_other_host(store, key: str, timeout: float) -> bool:
    """Poll the shared store until another worker's fetch of ``key`` is over (it releases its
    lock once the answer is stored, and the lock expires if that worker died). False when
    ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    interval = POLL_FIRST
    while await store.locked(key):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 2, POLL_MAX)
    return True
