"""The bad-input corpus (tests/corpus/requests.toml): each case over a raw socket to a real
gateway in front of a recording upstream. The answer and what the upstream saw are checked."""

import asyncio
import json
import re
import subprocess
import tomllib
from pathlib import Path

import httptools
import pytest

from support import PLUGWAY, http_response

CASES = tomllib.loads((Path(__file__).parent / "corpus" / "requests.toml").read_text())["case"]
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate"}
IDENTITY = {"x-consumer-id", "x-consumer-username", "x-consumer-roles", "x-consumer-scopes", "x-consumer-groups",
            "x-authenticated-userid", "x-authenticated-scope"}


def expand(raw: str) -> bytes:
    """'{300*a}' in a case stands for 300 times 'a'; \\u00XX escapes stand for single bytes."""
    return re.sub(r"\{(\d+)\*(.*?)\}", lambda m: m.group(2) * int(m.group(1)), raw, flags=re.S).encode("latin-1")


CONFIG = """
[server]
client_max_body = "3KiB"
[log]
access = false
[[upstreams]]
name = "app"
targets = [{{ url = "{url}" }}]
[[routes]]
name = "api"
prefix = "/api"
upstream = "app"
strip_prefix = true
[[routes]]
name = "admin"
prefix = "/admin"
upstream = "app"
methods = ["DELETE"]
[[routes]]
name = "files"
prefix = "/files"
upstream = "app"
keep_encoded_slashes = true
[[routes]]
name = "matrix"
prefix = "/matrix"
upstream = "app"
allow_semicolons = true
[[routes]]
name = "search"
prefix = "/search"
upstream = "app"
allow_body_on = ["GET"]
"""


class ParsedRequest:
    def __init__(self, data: bytes) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.url = b""
        self.complete = False
        parser = httptools.HttpRequestParser(self)
        parser.feed_data(data)
        assert self.complete, "the upstream got an incomplete request"

    def on_url(self, url): self.url += url
    def on_header(self, name, value): self.headers.append((name.decode().lower(), value.decode()))
    def on_body(self, body): self.body += body
    def on_message_complete(self): self.complete = True


# Refusals of the request's framing or head close the connection: what follows cannot be trusted.
CLOSING = {400, 413, 414, 431, 505}


async def exchange(port: int, data: bytes, segment: int | None) -> tuple[bytes, bool]:
    """Send ``data`` (in writes of ``segment`` bytes when given); return the first response and
    whether the gateway then closed the connection (only waited for after a closing status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = segment or len(data)
    try:
        for start in range(0, len(data), step):
            writer.write(data[start:start + step])
            await writer.drain()
    except ConnectionError:
        pass  # refused mid-way: the answer is already on its way
    answer, closed = b"", False
    try:
        while not _one_response(answer):
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                return answer, True
            answer += chunk
        if answer[9:12].isdigit() and int(answer[9:12]) in CLOSING:
            closed = await asyncio.wait_for(reader.read(65536), 10) == b""
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    return answer, closed


def _one_response(data: bytes) -> bool:
    head, separator, body = final_response(data).partition(b"\r\n\r\n")
    if not separator or head.startswith(b"HTTP/1.1 1"):
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


def final_response(data: bytes) -> bytes:
    """``data`` without the interim (1xx) responses before the final one."""
    while data.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in data:
        data = data.partition(b"\r\n\r\n")[2]
    return data


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
async def test_corpus(case, raw_upstream, plugway_gateway):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(CONFIG.format(url=upstream.url))
    answer, closed = await exchange(gateway.port, expand(case["raw"]), case.get("segment"))
    if case.get("no_interim"):
        assert not answer.startswith(b"HTTP/1.1 100"), "invited the body before refusing it"
    answer = final_response(answer)
    status = int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else None
    assert status == case["status"], answer[:300]
    if status >= 400 and not case["raw"].startswith("HEAD"):
        assert b'"error":{"status":%d' % status in answer
    if status in CLOSING:
        assert closed, "the gateway kept the connection open after refusing its framing"
    assert len(upstream.received) == case.get("forwarded", 0), upstream.received
    for received in upstream.received:
        request = ParsedRequest(received)  # exactly one well-framed request
        names = [name for name, _ in request.headers]
        assert not HOP_BY_HOP & set(names)
        assert not IDENTITY & set(names)
        assert names.count("transfer-encoding") + names.count("content-length") <= 1
        for name in case.get("absent", []):
            assert name.lower() not in names
        for name in case.get("present", []):
            assert name.lower() in names
        for text in case.get("not_containing", []):
            assert text.encode() not in received
        if "path" in case:
            assert request.url.decode() == case["path"]
        if "body" in case:
            assert request.body == expand(case["body"])


def test_the_pure_python_parser_is_refused(tmp_path):
    """The same corpus cannot be answered differently by aiohttp's other parser: the gateway
    refuses to start with it (it hangs on S14 and S17 and accepts S24)."""
    import os

    config = tmp_path / "c.toml"
    text = CONFIG.format(url="http://127.0.0.1:9") + '\n[admin]\nlisten = "127.0.0.1:0"\n'
    config.write_text(text.replace("[server]\n", f'[server]\nruntime_dir = "{tmp_path}/run"\nlisten = ["127.0.0.1:0"]\n'))
    result = subprocess.run([PLUGWAY, "run", "-c", str(config)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"})
    assert result.returncode == 1
    assert "C HTTP parser is not in use" in result.stderr


async def test_a_refusal_by_the_parser_is_logged_with_its_reason(raw_upstream, plugway_gateway, capfd):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(CONFIG.format(url=upstream.url).replace("access = false", "access = true"))
    raw = b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    answer, closed = await exchange(gateway.port, raw, None)
    assert answer.startswith(b"HTTP/1.1 400") and closed
    assert b"Duplicate" not in answer  # the client gets the generic message
    gateway.gateway.access_log.flush()
    line = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert (line["status"], line["error"], line["reason"]) == (400, "bad_request", "Duplicate Content-Length")
