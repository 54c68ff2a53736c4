"""Reloads and stops: WebSockets keep working on the draining worker until drain_timeout, then get 1001."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import UTC, datetime

import pytest
import websockets

SERVER = 'workers = 1\ngraceful_timeout = "15s"'


def holds_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` still has the listening socket of ``port`` open (so it may accept on it)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    listening.add(f"socket:[{fields[9]}]")
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in listening:
                return True
        except FileNotFoundError:
            continue
    return False


def logged_at(gateway, text: str) -> float:
    """When the gateway's own log (JSON lines on stderr) says ``text``, by its clock (whole milliseconds)."""
    for line in gateway.stderr_path.read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if text in entry.get("message", ""):
            return datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    raise AssertionError(f"not logged: {text}")


async def echo(ws, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 5) == text


async def test_a_reload_drains_websockets_with_1001_and_new_ones_go_to_the_new_worker(
        plugway_process, threaded_upstream, ws_config, ws_connect, eventually):
    gateway = plugway_process(ws_config(threaded_upstream.base, 'drain_timeout = "2s"', server=SERVER, access_log=True))
    url = f"ws://127.0.0.1:{gateway.port}/ws/echo"
    old_pid = gateway.ready_workers()[0]["pid"]
    old = [await ws_connect(url) for _ in range(3)]
    for index, ws in enumerate(old):
        await echo(ws, f"old {index}")

    assert holds_listener(old_pid, gateway.port)
    gateway.signal(signal.SIGHUP)
    await eventually(lambda: not holds_listener(old_pid, gateway.port), timeout=30)  # the old worker is draining
    new = await ws_connect(url)  # accepted by the new worker at once
    await echo(new, "new")
    for index, ws in enumerate(old):
        await echo(ws, f"still relayed while draining {index}")

    for ws in old:
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 15)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "going away")  # never 1006
    await eventually(lambda: gateway.logged("drain_timeout reached: closing 3 WebSockets"))
    drained_for = (logged_at(gateway, "drain_timeout reached: closing 3 WebSockets")
                   - logged_at(gateway, "draining: 3 open WebSockets"))
    assert drained_for >= 2 - 0.002  # kept for drain_timeout, by the worker's own clock (log times: whole ms)
    await eventually(lambda: threaded_upstream.record.closes.count((1001, "going away")) == 3)
    await eventually(lambda: old_pid not in {w["pid"] for w in gateway.status().get("workers", [])}, timeout=30)
    await echo(new, "the new worker keeps it")  # it was never on the old worker
    await new.close()

    await eventually(lambda: len([line for line in gateway.access_log() if line["status"] == 101]) == 4)
    lines = [line for line in gateway.access_log() if line["status"] == 101]
    drained = [line for line in lines if line["websocket_close"] == 1001]
    assert len(drained) == 3
    assert all(line["websocket_messages_in"] == line["websocket_messages_out"] == 2 for line in drained)
    assert all(line["bytes_in"] == line["bytes_out"] > 0 and line["duration_ms"] > 1000 for line in drained)
    assert [line["websocket_close"] for line in lines if line not in drained] == [1000]


async def test_a_stop_closes_websockets_with_1001_before_the_worker_exits(plugway_process, threaded_upstream,
                                                                         ws_config, ws_connect, eventually):
    gateway = plugway_process(ws_config(threaded_upstream.base, 'drain_timeout = "500ms"', server=SERVER))
    ws = await ws_connect(f"ws://127.0.0.1:{gateway.port}/ws/echo")
    await echo(ws, "before the stop")
    gateway.signal(signal.SIGTERM)
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 15)
    assert closed.value.rcvd.code == 1001
    await eventually(lambda: gateway.process.poll() is not None, timeout=20)
    assert gateway.process.returncode == 0
    assert threaded_upstream.record.closes == [(1001, "going away")]


def test_drain_timeout_must_be_below_the_graceful_timeout(tmp_path, ws_config):
    import subprocess

    from gateway.testing import PLUGWAY

    path = tmp_path / "plugway.toml"
    path.write_text(ws_config("http://127.0.0.1:9", 'drain_timeout = "20s"', server=SERVER))
    result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "routes[0].plugins.websocket.drain_timeout: must be below server.graceful_timeout (15s)" in result.stderr


async def test_a_draining_worker_refuses_new_handshakes_and_keeps_open_ones_until_the_deadline(
        plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url, refused, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, 'drain_timeout = "2s"'))
    url = ws_url(gateway, "/ws/echo")
    ws = await ws_connect(url)
    await echo(ws, "before")
    loop = asyncio.get_running_loop()
    await gateway.gateway.drain_plugins()  # what the worker does once it has stopped accepting
    draining = gateway.gateway.state["websocket"].draining_since  # by this loop's clock: the gateway runs in it
    status, body = await refused(ws_connect, url)
    assert (status, body["error"]["code"]) == (503, "websocket_draining")
    await echo(ws, "during the drain")
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "going away")
    assert 2 <= loop.time() - draining < 6  # the sweeper visits at most a second apart
    await eventually(lambda: ws_upstream.record.closes == [(1001, "going away")])
