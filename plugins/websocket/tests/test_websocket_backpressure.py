"""A slow reader pauses the other side: the gateway's memory stays flat (a real worker process)."""

from __future__ import annotations

import asyncio

MIB = 1 << 20


async def test_a_slow_reader_pauses_the_upstream_and_memory_stays_flat(plugway_process, threaded_upstream, ws_config,
                                                                      ws_connect, peak_rss):
    total = 200 * MIB
    gateway = plugway_process(ws_config(threaded_upstream.base, 'max_message_size = "2MiB"', server="workers = 1"))
    pid = gateway.ready_workers()[0]["pid"]
    record = threaded_upstream.record
    with peak_rss(pid) as memory:
        async with ws_connect(f"ws://127.0.0.1:{gateway.port}/ws/flood?mib={total // MIB}", max_size=2 * MIB,
                              max_queue=1) as ws:
            # The client reads nothing: the upstream must come to a stop, well short of the total.
            last, unchanged_since = -1, asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - unchanged_since < 1.0:
                await asyncio.sleep(0.1)
                if record.sent_bytes != last:
                    last, unchanged_since = record.sent_bytes, asyncio.get_running_loop().time()
            stalled_at = record.sent_bytes
            growth_while_stalled = memory.rss() - memory.baseline
            received = 0
            while received < total:
                received += len(await ws.recv())
    print(f"upstream stalled after {stalled_at / MIB:.0f} MiB; worker RSS growth {growth_while_stalled / MIB:.1f} MiB "
          f"while stalled, peak {(memory.peak - memory.baseline) / MIB:.1f} MiB over {total / MIB:.0f} MiB")
    assert 0 < stalled_at < 80 * MIB  # kernel socket buffers hold some; the gateway holds a few MiB at most
    assert received == total
    assert growth_while_stalled < 16 * MIB
    assert memory.peak - memory.baseline < 24 * MIB
