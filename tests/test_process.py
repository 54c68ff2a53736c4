"""`plugway run` as a real process: streaming with flat memory, and a graceful stop."""

import asyncio
import signal
import threading
import time

from support import async_wait_until, route_config

GIB = 1 << 30
MIB = 1 << 20
CHUNK = b"\0" * MIB


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's resident memory in a thread while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def start_streaming_upstream():
    async def serve(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST"):
            length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
            received = 0
            while received < length:
                received += len(await reader.read(MIB))
            body = str(received).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
            for _ in range(GIB // MIB):
                writer.write(CHUNK)
                await writer.drain()
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_one_gib_each_way_streams_with_flat_gateway_memory(plugway_process):
    upstream = await start_streaming_upstream()
    port = upstream.sockets[0].getsockname()[1]
    gateway = plugway_process(route_config(f"http://127.0.0.1:{port}", server='workers = 1\nclient_max_body = "2GiB"'))
    pid = gateway.ready_workers()[0]["pid"]

    with PeakRss(pid) as upload:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /api/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % GIB)
        for _ in range(GIB // MIB):
            writer.write(CHUNK)
            await writer.drain()
        answer = await reader.read(-1)
        writer.close()
    assert answer.endswith(b"\r\n\r\n%d" % GIB)

    with PeakRss(pid) as download:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /api/down HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        received = 0
        while chunk := await reader.read(MIB):
            received += len(chunk)
        writer.close()
    assert b"Content-Length: %d" % GIB in head
    assert received == GIB

    upstream.close()
    growth = max(upload.peak - upload.baseline, download.peak - download.baseline)
    print(f"gateway RSS: baseline {upload.baseline / MIB:.1f} MiB, peak growth upload "
          f"{(upload.peak - upload.baseline) / MIB:.1f} MiB, download {(download.peak - download.baseline) / MIB:.1f} MiB")
    assert growth < 32 * MIB


async def test_sigterm_lets_an_in_flight_request_finish(plugway_process, aiohttp_raw_server):
    from aiohttp import web

    started = asyncio.Event()

    async def slow(request):
        started.set()
        await asyncio.sleep(1.5)
        return web.Response(text="finished")

    upstream = await aiohttp_raw_server(slow)
    gateway = plugway_process(route_config(str(upstream.make_url("")).rstrip("/"), server="workers = 1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(started.wait(), 10)
    gateway.signal(signal.SIGTERM)
    answer = await asyncio.wait_for(reader.read(-1), 20)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"finished")
    assert b"Connection: close" in answer  # a draining gateway tells keep-alive clients to go
    deadline = time.monotonic() + 20
    await async_wait_until(lambda: gateway.process.poll() is not None or time.monotonic() > deadline)
    assert gateway.process.returncode == 0
