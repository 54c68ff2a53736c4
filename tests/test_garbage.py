"""The worker's garbage-collector policy (gateway/garbage.py): pauses timed, survivors frozen until the thaw."""

import contextlib
import gc
import weakref
from collections.abc import Iterator

from gateway.garbage import Collector
from gateway.metrics import GatewayMetrics
from gateway.testing import proxy_config


class Node:
    """An object that can sit in a reference cycle and be watched through a weak reference."""

    partner: "Node | None" = None


def cycle_watched() -> tuple[Node, weakref.ref]:
    node = Node()
    node.partner = node
    return node, weakref.ref(node)


@contextlib.contextmanager
def installed(freeze_after: float, thaw_interval: float = 1e-9) -> Iterator[Collector]:
    """A collector in gc.callbacks for the block; afterwards nothing of this process stays frozen."""
    collector = Collector(GatewayMetrics(), freeze_after=freeze_after, thaw_interval=thaw_interval)
    collector.install()
    try:
        yield collector
    finally:
        collector.remove()
        gc.unfreeze()


async def test_each_garbage_collection_is_timed_by_generation_while_the_gateway_runs(plugway_gateway):
    gateway = await plugway_gateway(proxy_config("http://127.0.0.1:9"))
    before = [gateway.metric("plugway_gc_pause_seconds_count", generation=str(g)) for g in range(3)]
    gc.collect(0)
    gc.collect(2)
    gc.collect(2)
    after = [gateway.metric("plugway_gc_pause_seconds_count", generation=str(g)) for g in range(3)]
    assert after[0] >= before[0] + 1 and after[2] >= before[2] + 2
    assert gateway.metric("plugway_gc_pause_seconds_sum", generation="2") > 0
    await gateway.stop()
    gc.collect(2)  # no longer timed: the gateway took its callback out when it stopped
    assert gateway.metric("plugway_gc_pause_seconds_count", generation="2") == after[2]


def test_the_survivors_of_a_long_full_collection_stay_frozen_until_the_thaw():
    with installed(freeze_after=1e-9) as collector:  # every pause is long
        node, alive = cycle_watched()
        gc.collect()
        assert gc.get_freeze_count() > 0 and collector.first_frozen is not None
        del node
        gc.collect()
        assert alive() is not None  # frozen when it was alive: its cycle is not walked any more
        collector.thaw_when_due()
        assert alive() is None  # the thaw's full collection reclaimed it
        assert gc.get_freeze_count() > 0  # and, long too, froze its survivors again


def test_a_short_full_collection_freezes_nothing_and_start_up_objects_are_not_thawed():
    with installed(freeze_after=3600.0) as collector:
        gc.freeze()  # as a worker freezes its start-up objects
        frozen = gc.get_freeze_count()
        node, alive = cycle_watched()
        gc.collect()
        del node
        gc.collect()
        assert alive() is None and gc.get_freeze_count() == frozen and collector.first_frozen is None
        collector.thaw_when_due()  # the collector froze nothing: no thaw
        assert gc.get_freeze_count() == frozen > 0
