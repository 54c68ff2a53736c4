"""Why a credential was refused, and the client-facing errors made from that.

Logic modules raise ``Refused(reason)``; the hook glue turns it into a 401 (or a 503 when
the gateway, not the client, is at fault) with ``WWW-Authenticate`` as RFC 6750 says. The
reason is also the label of ``plugway_auth_failures_total``. Descriptions say what kind
of problem it is and never echo the token or key.
"""

from __future__ import annotations

from gateway import GatewayError

DESCRIPTIONS = {
    "missing": "credentials are required",
    "ambiguous": "more than one credential was sent",
    "too_large": "the token is too large",
    "malformed": "the token is malformed",
    "algorithm": "the token's algorithm is not accepted",
    "unknown_issuer": "the token's issuer is not accepted",
    "unknown_key": "the token's signing key is unknown",
    "bad_signature": "the token's signature is invalid",
    "expired": "the token has expired",
    "not_yet_valid": "the token is not valid yet",
    "invalid_claims": "the token's claims are not accepted",
    "revoked": "the token has been revoked",
    "invalid_api_key": "the API key is not valid",
    "expired_api_key": "the API key has expired",
}
UNAVAILABLE = {
    "keys_unavailable": "the identity provider's keys cannot be fetched right now",
    "store_unavailable": "token revocations cannot be checked right now",
}


class Refused(Exception):
    """A credential is refused; ``reason`` is a key of DESCRIPTIONS or UNAVAILABLE."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthorized(GatewayError):
    status, code = 401, "invalid_token"


class MissingCredentials(Unauthorized):
    code = "missing_credentials"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class AuthUnavailable(GatewayError):
    status, code = 503, "auth_unavailable"


def client_error(reason: str, realm: str) -> GatewayError:
    """The error answering a refusal: 401 with its challenge, or 503 with Retry-After."""
    if reason in UNAVAILABLE:
        return AuthUnavailable(UNAVAILABLE[reason], headers=[("Retry-After", "1")])
    description = DESCRIPTIONS[reason]
    if reason == "missing":
        # RFC 6750 section 3.1: a request without credentials gets no error code.
        return MissingCredentials(description, headers=[("WWW-Authenticate", f'Bearer realm="{realm}"')])
    challenge = f'Bearer realm="{realm}", error="invalid_token", error_description="{description}"'
    kind = InvalidApiKey if reason in ("invalid_api_key", "expired_api_key") else Unauthorized
    return kind(description, headers=[("WWW-Authenticate", challenge)])
