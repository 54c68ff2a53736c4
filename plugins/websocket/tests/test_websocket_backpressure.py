"""A slow reader pauses the other side, either way: the gateway's memory stays flat (a real worker process)."""

from __future__ import annotations

import asyncio

MIB = 1 << 20
TOTAL = 200 * MIB


async def stalled(count) -> int:
    """``count()`` once it has stopped growing: unchanged for a second."""
    loop = asyncio.get_running_loop()
    last, unchanged_since = -1, loop.time()
    while loop.time() - unchanged_since < 1.0:
        await asyncio.sleep(0.1)
        if count() != last:
            last, unchanged_since = count(), loop.time()
    return last


def start(plugway_process, threaded_upstream, ws_config) -> tuple[str, int]:
    """A one-worker gateway in front of the threaded upstream: its ws:// base URL and its worker's pid."""
    gateway = plugway_process(ws_config(threaded_upstream.base, 'max_message_size = "2MiB"', server="workers = 1"))
    return f"ws://127.0.0.1:{gateway.port}/ws", gateway.ready_workers()[0]["pid"]


def check_bounded(stalled_at: int, growth_while_stalled: int, memory) -> None:
    print(f"stalled after {stalled_at / MIB:.0f} MiB; worker RSS growth {growth_while_stalled / MIB:.1f} MiB "
          f"while stalled, peak {(memory.peak - memory.baseline) / MIB:.1f} MiB over {TOTAL / MIB:.0f} MiB")
    assert 0 < stalled_at < 80 * MIB  # kernel socket buffers hold some; the gateway holds a few MiB at most
    assert growth_while_stalled < 16 * MIB
    assert memory.peak - memory.baseline < 24 * MIB


async def test_a_slow_reader_pauses_the_upstream_and_memory_stays_flat(plugway_process, threaded_upstream, ws_config,
                                                                      ws_connect, peak_rss):
    base, pid = start(plugway_process, threaded_upstream, ws_config)
    record = threaded_upstream.record
    with peak_rss(pid) as memory:
        async with ws_connect(f"{base}/flood?mib={TOTAL // MIB}", max_size=2 * MIB, max_queue=1) as ws:
            # The client reads nothing: the upstream must come to a stop, well short of the total.
            stalled_at = await stalled(lambda: record.sent_bytes)
            growth_while_stalled = memory.rss() - memory.baseline
            received = 0
            while received < TOTAL:
                received += len(await ws.recv())
    assert received == TOTAL
    check_bounded(stalled_at, growth_while_stalled, memory)


async def test_a_slow_upstream_reader_pauses_the_client_and_memory_stays_flat(plugway_process, threaded_upstream,
                                                                            ws_config, ws_connect, peak_rss,
                                                                            eventually):
    base, pid = start(plugway_process, threaded_upstream, ws_config)
    record = threaded_upstream.record
    sent = 0
    with peak_rss(pid) as memory:
        async with ws_connect(f"{base}/sink") as ws:

            async def send_all() -> None:
                nonlocal sent
                while sent < TOTAL:
                    await ws.send(b"\x02" * MIB)  # returns once the client's buffer is below its limit
                    sent += MIB

            sending = asyncio.create_task(send_all())
            # The upstream reads nothing: the client's sends must come to a stop, well short of the total.
            stalled_at = await stalled(lambda: sent)
            growth_while_stalled = memory.rss() - memory.baseline
            assert not sending.done() and record.received_bytes == 0
            record.start_reading.set()
            await asyncio.wait_for(sending, 120)
            await eventually(lambda: record.received_bytes == TOTAL, timeout=60)
    check_bounded(stalled_at, growth_while_stalled, memory)
