"""The core configuration: frozen settings classes, one per TOML table.

Plugin tables (``[plugins.NAME]`` and ``[routes.plugins.NAME]``) are kept as
raw, read-only tables here; each plugin reads its own (see ``gateway.plugins``).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from ..paths import BadPath, canonical_path, template_error
from .schema import setting
from .units import Duration, Size

Table = Mapping[str, Any]


def parse_address(text: str) -> tuple[str, int]:
    """'0.0.0.0:8080', '[::]:8080', 'localhost:80' -> (host, port)."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an address such as \"0.0.0.0:8080\"")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'{text!r} is not host:port (for example "0.0.0.0:8080" or "[::]:8080")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif not host or ":" in host:
        raise ValueError(f'{text!r}: write IPv6 hosts in brackets, as "[::]:8080"')
    return host, int(port)


def _check_address(text: Any) -> str:
    parse_address(text)
    return text




def _parse_workers(raw: Any) -> int | str:
    if raw == "auto":
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError(f'must be "auto" or a positive integer, not {raw!r}')
    return raw


def _parse_networks(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise ValueError("must be an array of addresses or CIDR ranges")
    for item in raw:
        try:
            ipaddress.ip_network(item, strict=False)
        except (ValueError, TypeError):
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
    return tuple(raw)


def _parse_header_name(raw: Any) -> str:
    if not isinstance(raw, str) or not raw or not all(c.isalnum() or c == "-" for c in raw):
        raise ValueError(f"{raw!r} is not a header name (letters, digits and '-')")
    return raw


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _FrozenTable({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


class _FrozenTable(Mapping):
    """A read-only TOML table that compares equal to the dict it came from."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def _parse_plugin_tables(raw: Any) -> Mapping[str, Table]:
    if not isinstance(raw, Mapping):
        raise ValueError("must be a table of plugin tables")
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"plugins.{name} must be a table, as [plugins.{name}]")
    return _freeze(raw)


def _render_plugin_tables(tables: Mapping[str, Table]) -> dict[str, Any]:
    def thaw(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: thaw(item) for key, item in value.items()}
        if isinstance(value, tuple):
            return [thaw(item) for item in value]
        return value

    return thaw(tables)


def plugin_tables(**kwargs: Any) -> Any:
    return setting(
        doc=kwargs.pop("doc"),
        factory=lambda: _FrozenTable({}),
        parse=_parse_plugin_tables,
        render=_render_plugin_tables,
    )


def _parse_ciphers(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be an OpenSSL cipher list string")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(raw)
    except ssl.SSLError:
        raise ValueError(f"{raw!r} selects no cipher OpenSSL knows") from None
    return raw


@dataclass(frozen=True)
class CertificateSettings:
    cert: str = setting(doc="PEM file with the certificate and its chain.")
    key: str = setting(doc="PEM file with the private key (readable by the gateway's user only).")
    server_names: tuple[str, ...] = setting(
        (), doc="SNI names this certificate answers; default: the DNS names in the certificate.",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        from ..tls import CertificateError, check_certificate

        try:
            check_certificate(self.cert, self.key)
        except CertificateError as exc:
            yield "cert", str(exc)


@dataclass(frozen=True)
class TlsSettings:
    certificates: tuple[CertificateSettings, ...] = setting(doc="Certificates; the first also answers without SNI.")
    min_version: Literal["1.2", "1.3"] = setting("1.2", doc='Oldest TLS version accepted: "1.2" or "1.3".')
    ciphers: str | None = setting(None, doc="OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's).",
                                  parse=_parse_ciphers)
    alpn: tuple[str, ...] = setting(("http/1.1",), doc="ALPN protocols offered.")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.certificates:
            yield "certificates", "needs at least one certificate"
        if any(protocol != "http/1.1" for protocol in self.alpn):
            yield "alpn", 'only "http/1.1" is served'


@dataclass(frozen=True)
class ListenerSettings:
    address: str = setting(doc='"host:port" to listen on; IPv6 as "[::]:443".', parse=_check_address)
    tls: TlsSettings | None = setting(None, doc="Terminate TLS on this listener.")
    redirect_to_https: bool = setting(
        False, doc="Answer every request with a redirect to the same URL over https (301 for GET/HEAD, else 308).",
    )
    https_port: int = setting(443, doc="Port in the https URL of a redirect.")

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.redirect_to_https and self.tls is not None:
            yield "redirect_to_https", "only makes sense on a plain http listener"


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[str | ListenerSettings, ...] = setting(
        ("0.0.0.0:8080",),
        doc='Where to serve: "host:port" (IPv6 as "[::]:8080"), or a table { address, tls, redirect_to_https }.',
    )
    workers: int | str = setting("auto", doc='Worker processes; "auto" is the CPU count.', parse=_parse_workers)
    client_max_body: Size = setting(Size("10MiB"), doc="Largest request body accepted (413 beyond it).")
    trusted_proxies: tuple[str, ...] = setting(
        (), doc="Peers allowed to supply X-Forwarded-* and Forwarded; everyone else's are replaced.",
        parse=_parse_networks,
    )
    backlog: int = setting(2048, doc="Length of each listening socket's accept queue (capped by net.core.somaxconn).")
    request_id_header: str = setting(
        "X-Request-ID", doc="Header carrying the request id to the upstream and back.", parse=_parse_header_name,
    )
    keepalive_timeout: Duration = setting(Duration("75s"), doc="Idle client keep-alive connections close after this.")
    graceful_timeout: Duration = setting(
        Duration("30s"), doc="On stop or reload, in-flight requests get this long to finish.",
    )
    ready_timeout: Duration = setting(
        Duration("30s"), doc="A new worker must report ready within this, or it is killed (and a reload fails).",
    )
    worker_timeout: Duration = setting(
        Duration("30s"), doc="A worker whose event loop sends no heartbeat for this long is killed and replaced.",
    )
    max_requests: int = setting(0, doc="Recycle a worker after this many requests (0: never), through a drain.")
    max_requests_jitter: int = setting(0, doc="Add up to this many requests at random to max_requests, per worker.")
    max_memory: Size = setting(Size(0), doc="Recycle a worker whose resident memory exceeds this (0: never).")
    gc_freeze_pause: Duration = setting(
        Duration("20ms"), doc="A full garbage collection taking more CPU than this freezes its survivors (0: never).",
    )
    gc_thaw_interval: Duration = setting(
        Duration("10m"), doc="Unfreeze and collect everything this long after a freeze (0: never).",
    )
    runtime_dir: str | None = setting(
        None, doc="Pid file, status and metrics files; default /run/plugway as root, else $XDG_RUNTIME_DIR/plugway.",
    )
    methods: tuple[str, ...] = setting(
        ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"),
        doc="Methods the gateway accepts at all (405 otherwise; case-sensitive).",
    )
    max_request_line: Size = setting(Size(8190), doc="Longest request line (414 beyond it).")
    max_header_size: Size = setting(Size(8190), doc="Longest single header line (431 beyond it).")
    max_headers: int = setting(128, doc="Most header lines in one request (431 beyond it).")
    max_header_total: Size = setting(Size("32KiB"), doc="Largest request head in all (431 beyond it).")
    client_header_timeout: Duration = setting(
        Duration("10s"), doc="The whole request head must arrive within this (408 and close otherwise).",
    )
    client_body_timeout: Duration = setting(
        Duration("10s"), doc="Longest gap between two parts of a request body (408 and close otherwise).",
    )
    max_requests_per_connection: int = setting(1000, doc="Requests served on one client connection before closing it.")
    max_connections: int = setting(10000, doc="Client connections per worker; more are refused with 503.")
    max_connections_per_ip: int = setting(
        0, doc="Client connections per worker from one peer address (0: no limit); more are refused with 503.",
    )
    identity_headers: tuple[str, ...] = setting(
        ("X-Consumer-ID", "X-Consumer-Username", "X-Consumer-Roles", "X-Consumer-Scopes", "X-Consumer-Groups",
         "X-Authenticated-Userid", "X-Authenticated-Scope"),
        doc="Headers only the gateway may set: dropped from every client request, in any case or _ spelling.",
    )
    underscores_in_headers: bool = setting(
        False, doc="Forward client headers whose names contain '_' (dropped by default, as nginx does).",
    )

    @property
    def listeners(self) -> tuple[ListenerSettings, ...]:
        return tuple(item if isinstance(item, ListenerSettings) else ListenerSettings(address=item)
                     for item in self.listen)

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.listen:
            yield "listen", "needs at least one address"
        for index, item in enumerate(self.listen):
            if isinstance(item, str):
                try:
                    parse_address(item)
                except ValueError as exc:
                    yield f"listen[{index}]", str(exc)
        addresses = [listener.address for listener in self.listeners]
        if len(addresses) != len(set(addresses)):
            yield "listen", "lists an address twice"
        if self.max_headers < 1:
            yield "max_headers", "must be at least 1"
        if self.max_requests < 0 or self.max_requests_jitter < 0:
            yield "max_requests", "must not be negative"
        if self.ready_timeout <= 0 or self.worker_timeout <= 0:
            yield "worker_timeout", "timeouts must be longer than zero"
        for method in self.methods:
            if not method.isalpha() or not method.isupper():
                yield "methods", f"{method!r} is not an upper-case HTTP method"
        if self.max_connections < 1 or self.max_connections_per_ip < 0 or self.max_requests_per_connection < 1:
            yield "max_connections", "connection limits must be positive (max_connections_per_ip: 0 for none)"


@dataclass(frozen=True)
class AdminSettings:
    listen: str | None = setting(
        "127.0.0.1:9901", doc="Admin listener (/health, /ready, /metrics, /status, /reload).",
        parse=_check_address,
    )
    token_env: str | None = setting(
        None, doc="Environment variable holding the bearer token for /status and /reload (required off loopback).",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.listen is None:
            return
        host, _ = parse_address(self.listen)
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        if not loopback and self.token_env is None:
            yield "token_env", f"is required when the admin API listens on a non-loopback address ({self.listen})"


@dataclass(frozen=True)
class LogSettings:
    access: bool = setting(True, doc="Write one JSON line per request.")
    access_path: str | None = setting(None, doc="File for the access log instead of stdout; reopened on USR1.")
    level: Literal["debug", "info", "warning", "error"] = setting("info", doc="Level of the gateway's own log.")


def redis_url_password(url: str) -> str | None:
    """The password a redis:// URL holds (``redis://:PASSWORD@host`` or ``redis://USER:PASSWORD@host``,
    read as redis-py reads it), or None."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return unquote(password) if at and colon and password else None


def mask_redis_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***``, as written otherwise: what logs,
    errors and ``config show`` print."""
    if not isinstance(url, str):
        return url
    scheme, sep, rest = url.partition("://")
    if sep:  # the authority ends where urlsplit ends it
        end = min([index for index in (rest.find(char) for char in "/?#") if index >= 0] or [len(rest)])
        userinfo, at, hostport = rest[:end].rpartition("@")
        user, colon, password = userinfo.partition(":")
        if at and colon and password:
            url = f"{scheme}://{user}:***@{hostport}{rest[end:]}"
    base, question, query = url.partition("?")
    if question:  # redis-py also reads ?password=...
        query, hash_sign, fragment = query.partition("#")
        query = "&".join("password=***" if item.partition("=")[0] == "password" else item for item in query.split("&"))
        url = base + question + query + hash_sign + fragment
    return url


@dataclass(frozen=True)
class StoreSettings:
    backend: Literal["local", "redis"] = setting(
        "local", doc='Where shared state lives: "local" (all workers of this host) or "redis" (across hosts).',
    )
    max_keys: int = setting(1_000_000, doc="Local store: most keys held; least recently used go first.")
    max_bytes: Size = setting(
        Size("512MiB"), doc="Local store: most memory held (values plus ~430 bytes per key); 1M rate-limit keys fit.",
    )
    timeout: Duration = setting(Duration("100ms"), doc="Longest wait for one store operation.")
    url: str | None = setting(
        None, doc='Redis: "redis://host:6379/0", "rediss://" for TLS, a password as "redis://:PASSWORD@host" '
                  'or "redis://USER:PASSWORD@host" (printed as ***).',
        render=lambda url: None if url is None else mask_redis_url(url),
    )
    password_env: str | None = setting(
        None, doc="Redis: environment variable holding the password (instead of one in url; also for Sentinel).",
    )
    tls_ca_file: str | None = setting(
        None, doc="Redis: CA bundle (PEM) that rediss:// servers' certificates are verified against; "
                  "the system store when unset.",
    )
    cluster: bool = setting(False, doc="Redis: the URL names a node of a Redis Cluster.")
    sentinels: tuple[str, ...] = setting((), doc='Redis Sentinel: "host:port" of each sentinel (instead of url).')
    sentinel_master: str | None = setting(None, doc="Redis Sentinel: the name of the monitored master.")
    pool_size: int = setting(64, doc="Redis: connections per worker.")
    key_prefix: str = setting("plugway:", doc="Redis: prefix of every key Plugway writes.")
    retry_interval: Duration = setting(
        Duration("1s"), doc="After a failure, operations fail at once for this long before Redis is tried again.",
    )

    def __repr__(self) -> str:  # the dataclass's own would show a password held in url
        shown = (f"{field.name}={mask_redis_url(value) if field.name == 'url' and value else value!r}"
                 for field in fields(self) for value in (getattr(self, field.name),))
        return f"StoreSettings({', '.join(shown)})"

    @property
    def password(self) -> str | None:
        """The Redis password: from the URL or from the variable named in password_env."""
        if self.url and (password := redis_url_password(self.url)):
            return password
        return os.environ.get(self.password_env) or None if self.password_env else None

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.backend == "redis" and not self.url and not self.sentinels:
            yield "url", 'is required with backend = "redis" (or sentinels and sentinel_master)'
        if self.sentinels and not self.sentinel_master:
            yield "sentinel_master", "is required with sentinels"
        if self.url and not self.url.startswith(("redis://", "rediss://")):
            yield "url", f"{mask_redis_url(self.url)!r} must start with redis:// or rediss://"
        if self.url:
            try:
                urlsplit(self.url).port
            except ValueError:
                yield "url", f"{mask_redis_url(self.url)!r} has an invalid port"
        if self.url and self.password_env and redis_url_password(self.url):
            yield "password_env", "the url holds a password already: give it in one place only"
        if self.tls_ca_file is not None:
            if not os.path.isfile(self.tls_ca_file) or not os.access(self.tls_ca_file, os.R_OK):
                yield "tls_ca_file", f"{self.tls_ca_file!r} is not a readable file"
            if not (self.url or "").startswith("rediss://"):
                yield "tls_ca_file", "only applies to a rediss:// url"
        for sentinel in self.sentinels:
            try:
                parse_address(sentinel)
            except ValueError as exc:
                yield "sentinels", str(exc)
        if self.max_keys < 1 or self.pool_size < 1:
            yield "max_keys", "max_keys and pool_size must be at least 1"


def _parse_statuses(raw: Any) -> tuple[str, ...]:
    """Statuses as "200" or classes as "2xx"."""
    if not isinstance(raw, list):
        raise ValueError('must be an array such as ["2xx", "301"]')
    for item in raw:
        text = str(item)
        if not (text.isdigit() and len(text) == 3 or len(text) == 3 and text[0].isdigit() and text[1:] == "xx"):
            raise ValueError(f'{item!r} is not a status ("200") or a class of statuses ("2xx")')
    return tuple(str(item) for item in raw)


@dataclass(frozen=True)
class HealthCheckSettings:
    path: str = setting("/health", doc="Path requested on each target.")
    interval: Duration = setting(Duration("5s"), doc="Time between two checks of a target.")
    timeout: Duration = setting(Duration("2s"), doc="A check not answered within this fails.")
    healthy_threshold: int = setting(2, doc="Passing checks in a row that make an unhealthy target healthy.")
    unhealthy_threshold: int = setting(3, doc="Failing checks in a row that make a healthy target unhealthy.")
    statuses: tuple[str, ...] = setting(("2xx",), doc='Statuses that pass: "200", or classes such as "2xx".',
                                        parse=_parse_statuses)
    host: str | None = setting(None, doc="Host header of the checks (default: the target's).")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.path.startswith("/"):
            yield "path", "must start with /"
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            yield "healthy_threshold", "thresholds must be at least 1"
        if self.interval <= 0:
            yield "interval", "must be longer than zero"


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_failures: int = setting(5, doc="Failures in a row that eject a target (0: never eject).")
    base_ejection_time: Duration = setting(
        Duration("30s"), doc="An ejection lasts this long times the number of times the target was ejected.",
    )
    max_ejection_percent: int = setting(50, doc="Most targets of the upstream ejected at once, in percent.")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.max_ejection_percent <= 100 or self.consecutive_failures < 0:
            yield "max_ejection_percent", "must be between 0 and 100 (consecutive_failures: 0 or more)"


RETRY_CONDITIONS = ("connect_failure", "timeout", "502", "503", "504")


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = setting(1, doc="Tries after the first one (0: never retry).")
    on: tuple[str, ...] = setting(
        ("connect_failure",), doc="What is retried: connect_failure, timeout (no response head in time), 502, 503, 504.",
    )
    methods: tuple[str, ...] = setting(
        ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"), doc="Methods that may be retried (idempotent ones by default).",
    )
    backoff: Duration = setting(Duration("25ms"), doc="Wait before the first retry; doubles each time, with jitter.")
    backoff_max: Duration = setting(Duration("250ms"), doc="Longest wait between tries.")
    per_try_timeout: Duration | None = setting(
        None, doc="Longest wait for each try's response head; read_timeout applies too (the first to expire wins).",
    )
    budget: int = setting(
        20, doc="Retries may add at most this percent on top of the requests to the upstream (per worker).",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        for condition in self.on:
            if condition not in RETRY_CONDITIONS:
                yield "on", f"{condition!r} is not one of {', '.join(RETRY_CONDITIONS)}"
        if self.attempts < 0 or not 0 <= self.budget <= 100:
            yield "budget", "must be between 0 and 100 (attempts: 0 or more)"


@dataclass(frozen=True)
class TargetSettings:
    url: str = setting(
        doc='"http://host:port", "https://host:port", or discovered: "dns://name:port" (A/AAAA records) or '
            '"srv://_http._tcp.name" (SRV records with their ports and weights).',
    )
    weight: int = setting(1, doc="Share of traffic relative to the other targets (SRV records bring their own).")

    @property
    def discovered(self) -> bool:
        return self.url.startswith(("dns://", "srv://"))

    def validate(self) -> Iterator[tuple[str, str]]:
        parts = urlsplit(self.url)
        if parts.scheme == "srv":
            if not parts.hostname or parts.port is not None:
                yield "url", f'{self.url!r}: write SRV names as "srv://_service._proto.name" (the records give ports)'
            return
        if parts.scheme not in ("http", "https", "dns") or not parts.hostname:
            yield "url", f'{self.url!r} is not an http://, https://, dns:// or srv:// URL with a host'
        elif parts.scheme == "dns" and parts.port is None:
            yield "url", f'{self.url!r}: a dns:// target needs a port'
        elif parts.path not in ("", "/") or parts.query or parts.fragment:
            yield "url", "must not have a path, query or fragment (use the route's strip_prefix and path instead)"
        try:
            parts.port
        except ValueError:
            yield "url", f"{self.url!r} has an invalid port"
        if not 0 < self.weight <= 1000:
            yield "weight", "must be between 1 and 1000"


Balance = Literal["round_robin", "least_conn", "p2c", "hash"]


@dataclass(frozen=True)
class UpstreamSettings:
    name: str = setting(doc="Name that routes refer to.")
    targets: tuple[TargetSettings, ...] = setting(doc="The servers behind this upstream.")
    balance: Balance = setting("round_robin", doc="round_robin (smooth weighted), least_conn, p2c or hash.")
    hash_on: str | None = setting(None, doc='For balance = "hash": "header:NAME", "cookie:NAME" or "ip".')
    connect_timeout: Duration = setting(Duration("5s"), doc="Time allowed to open a connection to a target.")
    read_timeout: Duration = setting(Duration("60s"), doc="Longest wait for the next byte of a response.")
    write_timeout: Duration = setting(Duration("60s"), doc="Longest wait for the target to take more request bytes.")
    max_connections: int = setting(256, doc="Connections per target per worker; more requests wait connect_timeout.")
    keepalive_timeout: Duration = setting(Duration("60s"), doc="Idle keep-alive connections to a target close after this.")
    timeout: Duration = setting(
        Duration(0), doc="Longest time for a response head across every try and backoff (0: read_timeout per try only).",
    )
    max_concurrent: int = setting(0, doc="Requests in flight to this upstream per worker; beyond it 503 at once (0: none).")
    health_check: HealthCheckSettings | None = setting(None, doc="Active health checks of every target.")
    outlier_detection: OutlierSettings = setting(factory=OutlierSettings, doc="Passive health: ejecting failing targets.")
    retries: RetrySettings = setting(factory=RetrySettings, doc="Retries of failed tries, within a budget.")
    panic_mode: bool = setting(False, doc="When every target is down, use them all anyway (Envoy's panic) instead of 503.")
    resolver: tuple[str, ...] = setting(
        (), doc='DNS servers for dns:// and srv:// targets, "ip" or "ip:port" (default: the system\'s).',
    )
    tls_verify: bool = setting(True, doc="Verify https targets' certificates and host names.")
    tls_ca_file: str | None = setting(None, doc="CA bundle for https targets; the system store when unset.")

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.targets:
            yield "targets", "needs at least one target"
        if self.balance == "hash":
            if self.hash_on is None:
                yield "hash_on", 'is required with balance = "hash"'
            elif not (self.hash_on == "ip" or self.hash_on.partition(":")[0] in ("header", "cookie")
                      and self.hash_on.partition(":")[2]):
                yield "hash_on", f'{self.hash_on!r} must be "header:NAME", "cookie:NAME" or "ip"'
        elif self.hash_on is not None:
            yield "hash_on", 'only applies with balance = "hash"'
        if self.max_connections < 1:
            yield "max_connections", "must be at least 1"
        if self.tls_ca_file is not None and not os.path.isfile(self.tls_ca_file):
            yield "tls_ca_file", f"{self.tls_ca_file!r} is not a readable file"


@dataclass(frozen=True)
class RouteSettings:
    name: str = setting(doc="Name used in logs and metrics.")
    upstream: str = setting(doc="Name of the upstream that serves this route.")
    prefix: str | None = setting(None, doc="Segment-aware path prefix: /api matches /api and /api/..., not /apix.")
    path: str | None = setting(None, doc='Path template with named segments, such as "/users/{id}".')
    methods: tuple[str, ...] = setting((), doc="Allowed methods; others get 405 with Allow. Empty allows all.")
    hosts: tuple[str, ...] = setting((), doc='Host names this route serves ("*.example.com" allowed). Empty: any.')
    strip_prefix: bool = setting(False, doc="Remove the matched prefix before forwarding.")
    preserve_host: bool = setting(False, doc="Forward the client's Host instead of the target's.")
    allow_body_on: tuple[str, ...] = setting(
        (), doc="Of GET, HEAD, OPTIONS and DELETE, the methods that may carry a body here (400 otherwise).",
    )
    keep_encoded_slashes: bool = setting(
        False, doc="Accept %2F and %5C in paths, forwarded as sent and never decoded for routing (400 otherwise).",
    )
    allow_semicolons: bool = setting(False, doc="Accept ';' parameters in path segments (400 otherwise).")
    connect_timeout: Duration | None = setting(None, doc="Overrides the upstream's connect_timeout on this route.")
    read_timeout: Duration | None = setting(None, doc="Overrides the upstream's read_timeout on this route.")
    timeout: Duration | None = setting(None, doc="Overrides the upstream's timeout (all tries) on this route.")
    plugins: Mapping[str, Table] = plugin_tables(doc="Per-route plugin settings: [routes.plugins.NAME].")

    def validate(self) -> Iterator[tuple[str, str]]:
        if (self.prefix is None) == (self.path is None):
            yield "", 'needs exactly one of "prefix" or "path"'
        if self.prefix is not None:
            try:
                canonical_path(self.prefix)
            except BadPath as exc:
                yield "prefix", f"{self.prefix!r}: {exc.reason}"
        if self.path is not None and (problem := template_error(self.path)):
            yield "path", f"{self.path!r}: {problem}"
        if self.strip_prefix and self.prefix is None:
            yield "strip_prefix", 'only applies to a route with "prefix"'
        for method in self.methods:
            if not method.isalpha() or not method.isupper():
                yield "methods", f"{method!r} is not an upper-case HTTP method"
        for method in self.allow_body_on:
            if method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
                yield "allow_body_on", f"{method!r}: only GET, HEAD, OPTIONS and DELETE are refused a body"


@dataclass(frozen=True)
class GatewaySettings:
    server: ServerSettings = setting(factory=ServerSettings, doc="The client-facing server.")
    admin: AdminSettings = setting(factory=AdminSettings, doc="The admin listener.")
    log: LogSettings = setting(factory=LogSettings, doc="Logging.")
    store: StoreSettings = setting(factory=StoreSettings, doc="Shared state for plugins (rate limits, revocations...).")
    upstreams: tuple[UpstreamSettings, ...] = setting((), doc="Groups of targets that routes send requests to.")
    routes: tuple[RouteSettings, ...] = setting((), doc="Which requests go where, in order of specificity.")
    plugins: Mapping[str, Table] = plugin_tables(doc="Plugins enabled on every route: [plugins.NAME].")

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from _duplicates(self.upstreams, "upstreams")
        yield from _duplicates(self.routes, "routes")
        known = {upstream.name for upstream in self.upstreams}
        for index, route in enumerate(self.routes):
            if route.upstream not in known:
                yield f"routes[{index}].upstream", f'unknown upstream "{route.upstream}"'

    def upstream(self, name: str) -> UpstreamSettings:
        return next(upstream for upstream in self.upstreams if upstream.name == name)


def _duplicates(items: tuple[Any, ...], key: str) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.name in seen:
            yield f"{key}[{index}].name", f'"{item.name}" is used twice'
        seen.add(item.name)
