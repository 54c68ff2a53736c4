"""TLS termination with certificates made by the test (cryptography), a real gateway and real clients."""

import asyncio
import socket
import ssl
import subprocess
import time

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import PLUGWAY, CertificateAuthority, route_config


@pytest.fixture
def authority(tmp_path):
    return CertificateAuthority(tmp_path)


async def echo(request):
    return web.json_response({"headers": dict(request.headers)})


def tls_config(upstream: str, certificates: list[tuple[str, str]], extra: str = "") -> str:
    certs = ", ".join(f'{{ cert = "{cert}", key = "{key}" }}' for cert, key in certificates)
    listener = f'{{ address = "127.0.0.1:0", tls = {{ certificates = [{certs}] {extra} }} }}'
    return route_config(upstream, server=f"listen = [{listener}]").replace("[log]", "[log]", 1)


async def handshake(port: int, context: ssl.SSLContext, server_name: str) -> tuple[x509.Certificate, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name)
    certificate = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    writer.write(f"GET /api/x HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return certificate, answer


async def test_tls_handshake_and_sni_picks_the_certificate(plugway_gateway, aiohttp_raw_server, authority):
    upstream = str((await aiohttp_raw_server(echo)).make_url("")).rstrip("/")
    first = authority.issue("first", "a.example")
    second = authority.issue("second", "b.example", "*.c.example")
    gateway = await plugway_gateway(tls_config(upstream, [first[:2], second[:2]]).replace(
        "strip_prefix = true", "strip_prefix = true\npreserve_host = true"))
    context = authority.client_context()
    for name, serial in (("a.example", first[2]), ("b.example", second[2]), ("x.c.example", second[2])):
        certificate, answer = await handshake(gateway.port, context, name)
        assert certificate.serial_number == serial, name
        assert answer.startswith(b"HTTP/1.1 200")
    certificate, _ = await handshake(gateway.port, ssl._create_unverified_context(), "unknown.example")
    assert certificate.serial_number == first[2]  # no match: the first certificate answers


async def test_the_upstream_learns_the_request_came_over_tls(plugway_gateway, aiohttp_raw_server, authority):
    upstream = str((await aiohttp_raw_server(echo)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(tls_config(upstream, [authority.issue("a", "a.example")[:2]]))
    assert gateway.url.startswith("https://")
    async with gateway.client.get("/api/x") as response:
        headers = (await response.json())["headers"]
    assert headers["X-Forwarded-Proto"] == "https"
    assert "proto=https" in headers["Forwarded"]


async def test_the_minimum_version_is_enforced(plugway_gateway, aiohttp_raw_server, authority):
    upstream = str((await aiohttp_raw_server(echo)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(tls_config(upstream, [authority.issue("a", "a.example")[:2]], ', min_version = "1.3"'))
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # refused in the handshake
        await handshake(gateway.port, authority.client_context(maximum=ssl.TLSVersion.TLSv1_2), "a.example")
    certificate, answer = await handshake(gateway.port, authority.client_context(), "a.example")
    assert answer.startswith(b"HTTP/1.1 200")


async def test_an_http_listener_can_redirect_to_https(plugway_gateway, aiohttp_raw_server):
    upstream = str((await aiohttp_raw_server(echo)).make_url("")).rstrip("/")
    config = route_config(upstream, server="listen = [{ address = \"127.0.0.1:0\", redirect_to_https = true, https_port = 8443 }]")
    gateway = await plugway_gateway(config)
    async with gateway.client.get("/api/x?q=1", headers={"Host": "shop.example"}, allow_redirects=False) as response:
        assert response.status == 301
        assert response.headers["Location"] == "https://shop.example:8443/api/x?q=1"
    async with gateway.client.post("/api/x", data=b"body", headers={"Host": "shop.example"},
                                   allow_redirects=False) as response:
        assert response.status == 308


def test_check_refuses_expired_and_mismatched_certificates(tmp_path, authority):
    expired = authority.issue("expired", "a.example", days=-1, start_days_ago=10)
    good = authority.issue("good", "a.example")
    other_key = authority.issue("other", "b.example")[1]
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(serialization.load_pem_private_key(open(good[1], "rb").read(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    for certificate, key, reason in ((expired[0], expired[1], "expired on"),
                                      (good[0], other_key, "does not match"),
                                      (str(tmp_path / "missing.pem"), good[1], "cannot read"),
                                      (good[0], str(encrypted), "is encrypted with a passphrase")):
        path = tmp_path / "tls.toml"
        path.write_text(tls_config("http://127.0.0.1:9", [(certificate, key)]))
        result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=60)  # an OpenSSL passphrase prompt would hang
        assert result.returncode == 2
        assert "server.listen[0].tls.certificates[0].cert:" in result.stderr and reason in result.stderr


async def test_a_renewed_certificate_is_served_after_a_reload_without_failures(
    plugway_process, aiohttp_raw_server, authority,
):
    upstream = str((await aiohttp_raw_server(echo)).make_url("")).rstrip("/")
    cert, key, old_serial = authority.issue("live", "a.example")
    gateway = plugway_process(tls_config(upstream, [(cert, key)]).replace("[server]", "[server]\nworkers = 2").replace("access = false", "access = true"))
    context = authority.client_context()
    outcomes = []
    stop = asyncio.Event()

    async def load():
        while not stop.is_set():
            try:
                certificate, answer = await handshake(gateway.port, context, "a.example")
                outcomes.append((certificate.serial_number, answer[9:12] if answer.startswith(b"HTTP/1.1 ") else answer))
            except (OSError, ssl.SSLError) as exc:
                outcomes.append((None, type(exc).__name__))

    clients = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.5)
    _, _, new_serial = authority.issue("live", "a.example")  # certbot renews the same files
    result = await asyncio.to_thread(gateway.cli, "reload")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 15
    while not any(serial == new_serial for serial, _ in outcomes[-4:]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*clients)
    print(f"TLS handshakes during the certificate reload: {len(outcomes)}")
    assert all(status == b"200" for _, status in outcomes), [o for o in outcomes if o[1] != b"200"][:5]
    serials = [serial for serial, _ in outcomes]
    assert serials[0] == old_serial and serials[-1] == new_serial


async def test_a_reload_with_a_broken_certificate_keeps_the_old_one(plugway_process, authority, tmp_path):
    cert, key, serial = authority.issue("kept", "a.example")
    gateway = plugway_process(tls_config("http://127.0.0.1:9", [(cert, key)]).replace("[server]", "[server]\nworkers = 1"))
    original = gateway.config_path.read_text()
    gateway.config_path.write_text(original.replace(key, str(tmp_path / "nope.key")))
    result = await asyncio.to_thread(gateway.cli, "reload")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and gateway.status()["generation"] == 1
    certificate, answer = await handshake(gateway.port, authority.client_context(), "a.example")
    assert certificate.serial_number == serial and answer.startswith(b"HTTP/1.1 ")  # still in service


async def test_the_listener_offers_only_its_ciphers_and_alpn_protocols(plugway_gateway, aiohttp_raw_server, authority):
    upstream = str((await aiohttp_raw_server(echo)).make_url("")).rstrip("/")
    settings = ', ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256", alpn = ["http/1.1"]'
    gateway = await plugway_gateway(tls_config(upstream, [authority.issue("a", "a.example")[:2]], settings))
    other_cipher = authority.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    other_cipher.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # TLS 1.2 with no suite in common
        await handshake(gateway.port, other_cipher, "a.example")
    client = authority.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    client.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, ssl=client, server_hostname="a.example")
    tls = writer.get_extra_info("ssl_object")
    assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert tls.selected_alpn_protocol() == "http/1.1"  # never h2, which the gateway does not speak
    writer.close()


def test_tls_sessions_resume_whichever_worker_takes_the_next_connection(plugway_process, authority):
    """The supervisor builds the contexts before forking, so the workers share session ticket keys."""
    cert, key, _ = authority.issue("resume", "a.example")
    gateway = plugway_process(tls_config("http://127.0.0.1:9", [(cert, key)]).replace("[server]", "[server]\nworkers = 2"))
    gateway.wait_for_workers(2)
    context = authority.client_context()
    session, resumed = None, []
    for _ in range(20):  # the kernel spreads them over both workers (source ports differ)
        with socket.create_connection(("127.0.0.1", gateway.port)) as raw, \
                context.wrap_socket(raw, server_hostname="a.example", session=session) as tls:
            tls.sendall(b"GET /api/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):
                pass
            resumed.append(tls.session_reused)
            session = tls.session
    assert resumed == [False] + [True] * 19
