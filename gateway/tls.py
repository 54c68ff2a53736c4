"""TLS termination: certificates chosen by SNI.

The supervisor builds each configuration's ``ssl.SSLContext`` objects from the
files named in it before forking that configuration's workers, as nginx's
master does: every worker of a generation then shares the session ticket keys
(OpenSSL makes them when a context is created), so a client resumes its TLS
session whichever worker the kernel gives its next connection to. A reload
(``HUP``, ``systemctl reload``) builds new contexts, picking up renewed
certificates with the rolling replacement and no dropped connection. A
certificate is checked when the
configuration is loaded (``plugway check``, and the supervisor on reload): an
unreadable file, a key that does not match, a certificate past its end date
or not yet valid is an error naming its TOML path, and a reload keeps the
certificates in service.

With several certificates, the one whose names (its ``server_names``, else
the DNS names in its subjectAltName) match the client's SNI name is used;
``*.example.com`` matches one label. Without a match (or without SNI) the
first certificate answers.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertificateError(ValueError):
    pass


def certificate_names(cert_path: str) -> tuple[str, ...]:
    """The DNS names of the first certificate in a PEM file (subjectAltName, else the CN)."""
    certificate = _load_certificate(cert_path)
    try:
        names = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        dns = tuple(name.lower() for name in names.get_values_for_type(x509.DNSName))
        if dns:
            return dns
    except x509.ExtensionNotFound:
        pass
    common = [attribute.value for attribute in certificate.subject if attribute.oid == x509.NameOID.COMMON_NAME]
    return tuple(str(name).lower() for name in common)


def check_certificate(cert_path: str, key_path: str, *, now: datetime.datetime | None = None) -> None:
    """Raise CertificateError when the pair cannot serve: unreadable, mismatched or out of its dates."""
    certificate = _load_certificate(cert_path)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        raise CertificateError(f"{cert_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if certificate.not_valid_before_utc > now:
        raise CertificateError(f"{cert_path} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_passphrase(key_path))
    except ssl.SSLError as exc:
        raise CertificateError(f"{key_path} does not match {cert_path} or cannot be read ({exc.reason})") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {key_path}: {exc.strerror}") from None


def _load_certificate(path: str) -> x509.Certificate:
    try:
        with open(path, "rb") as file:
            return x509.load_pem_x509_certificate(file.read())
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate") from None


def listener_contexts(listeners: Iterable[Any]) -> dict[str, ssl.SSLContext]:
    """{address: context} for the listeners (``ListenerSettings``) that terminate TLS."""
    contexts = {}
    for listener in listeners:
        tls = listener.tls
        if tls is not None:
            certificates = [(c.cert, c.key, c.server_names) for c in tls.certificates]
            contexts[listener.address] = server_context(certificates, tls.min_version, tls.ciphers, tls.alpn)
    return contexts


def server_context(
    certificates: Sequence[tuple[str, str, tuple[str, ...]]], min_version: str, ciphers: str | None,
    alpn: Sequence[str],
) -> ssl.SSLContext:
    """The listener's context: the first certificate by default, the others by SNI.

    ``certificates`` are ``(cert_path, key_path, server_names)``; empty names mean the
    certificate's own.
    """
    contexts = [_context(cert, key, min_version, ciphers, alpn) for cert, key, _ in certificates]
    by_name: dict[str, ssl.SSLContext] = {}
    for (cert, _, names), context in zip(certificates, contexts):
        for name in names or certificate_names(cert):
            by_name.setdefault(name.lower(), context)
    default = contexts[0]

    def choose(connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name:
            chosen = by_name.get(name.lower()) or by_name.get("*." + name.lower().partition(".")[2])
            if chosen is not None and chosen is not default:
                connection.context = chosen

    if len(certificates) > 1:
        default.sni_callback = choose
    return default


def _context(cert: str, key: str, min_version: str, ciphers: str | None, alpn: Sequence[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if ciphers:
        context.set_ciphers(ciphers)
    context.set_alpn_protocols(list(alpn))
    context.load_cert_chain(cert, key, password=_no_passphrase(key))
    return context


def _no_passphrase(key_path: str) -> Callable[[], str]:
    """A password callback that refuses: without one, OpenSSL prompts on the terminal for an
    encrypted key and a check or a start hangs."""
    def refuse() -> str:
        raise CertificateError(f"{key_path} is encrypted with a passphrase; give an unencrypted key "
                               "(readable by the plugway user only)")
    return refuse
