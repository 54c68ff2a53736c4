"""The worker's garbage-collector policy (gateway/garbage.py): pauses timed, survivors frozen until the thaw."""

import gc
import weakref

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


def test_what_survives_a_full_collection_stays_frozen_until_the_thaw():
    collector = Collector(GatewayMetrics(), freeze=True, thaw_interval=1e-9)
    collector.install()
    try:
        node, alive = cycle_watched()
        gc.collect()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen when it was alive: its cycle is not walked any more
        collector.thaw_when_due()
        assert alive() is None  # the thaw's full collection reclaimed it
        assert gc.get_freeze_count() > 0  # and froze the survivors again
    finally:
        collector.remove()
        gc.unfreeze()


def test_without_freezing_a_dead_cycle_goes_at_the_next_full_collection():
    collector = Collector(GatewayMetrics(), freeze=False)
    collector.install()
    try:
        node, alive = cycle_watched()
        gc.collect()
        del node
        gc.collect()
        assert alive() is None
    finally:
        collector.remove()
