"""The plugin's settings: what `plugway check` refuses, and the README documenting every key."""

from __future__ import annotations

import dataclasses
import subprocess
import textwrap
from pathlib import Path

import pytest

import plugway_auth
from gateway import config as gateway_config
from gateway.config.schema import ConfigErrors
from gateway.plugins import load_plugins
from gateway.testing import PLUGWAY, proxy_config

README = Path(plugway_auth.__file__).resolve().parent.parent / "README.md"


def errors_of(plugin: str, server: str = "") -> list[str]:
    text = proxy_config("http://127.0.0.1:9", server=server, plugins="[plugins.auth]\n" + textwrap.dedent(plugin))
    with pytest.raises(ConfigErrors) as caught:
        load_plugins(gateway_config.loads(text))
    return [str(error) for error in caught.value.errors]


def issuer(body: str, name: str = "idp") -> str:
    return f'[[plugins.auth.issuers]]\nname = "{name}"\n' + textwrap.dedent(body) + "\n"


def test_identity_headers_must_be_ones_the_core_strips():
    messages = errors_of('anonymous = true\nconsumer_header = "X-User"\nclaim_headers = { X-Consumer-Email = "email" }')
    assert any(m.startswith("plugins.auth.consumer_header: X-User must be listed in server.identity_headers")
               for m in messages)
    assert any(m.startswith("plugins.auth.claim_headers: X-Consumer-Email must be listed") for m in messages)
    listed = 'identity_headers = ["X-User", "X-Consumer-Roles", "X-Consumer-Scopes"]'
    text = proxy_config("http://127.0.0.1:9", server=listed, plugins="""
        [plugins.auth]
        anonymous = true
        consumer_header = "x-user"
    """)
    load_plugins(gateway_config.loads(text))  # accepted once listed (in any case)


@pytest.mark.parametrize("plugin, expected", [
    (issuer('algorithms = ["none"]\njwks_url = "https://idp/jwks"'), "issuers[0].algorithms: 'none' is not accepted"),
    (issuer('algorithms = ["RS256", "HS256"]\njwks_url = "https://idp/jwks"'), "mixes HMAC and public-key"),
    (issuer('algorithms = ["RS256"]'), "needs exactly one of jwks_url, public_keys and hmac_keys"),
    (issuer('algorithms = ["RS256"]\npublic_keys = [{ file = "/nonexistent.pem" }]'), "cannot read /nonexistent.pem"),
    (issuer('algorithms = ["RS256"]\njwks_url = "file:///etc/passwd"'), "must be an http:// or https:// URL"),
    (issuer('algorithms = ["HS256"]\nhmac_keys = [{ secret = "inline" }]'), "secrets never go in the file"),
    (issuer('algorithms = ["HS256"]\nhmac_keys = [{ secret = { env = "PLUGWAY_AUTH_UNSET" } }]'), "is not set"),
    ('token_sources = ["bearer", "url:x"]\nanonymous = true', "is not a credential source"),
    ('[[plugins.auth.api_keys]]\nhash = "pwk_plaintext"\nconsumer = "x"', 'must be "sha256:" followed by 64 hex'),
    ('[[plugins.auth.api_keys]]\nhash = "sha256:' + "0" * 64 + '"\nconsumer = "anonymous"', 'not "anonymous"'),
    ("", "configure issuers, api_keys or token_endpoint"),
    ('realm = "a\\"b"\nanonymous = true', "realm: may hold only"),
    (issuer('algorithms = ["RS256"]\njwks_url = "https://a/jwks"') + issuer('algorithms = ["ES256"]\n'
                                                                             'jwks_url = "https://b/jwks"', "b"),
     "at most one issuer may leave `issuer` unset"),
])
def test_bad_settings_are_reported_with_their_path(plugin, expected):
    messages = errors_of(plugin)
    assert any(m.startswith("plugins.auth") and expected in m for m in messages), messages


def test_short_hmac_secrets_are_refused(tmp_path):
    short = tmp_path / "short"
    short.write_text("x" * 40)
    messages = errors_of(issuer(f'algorithms = ["HS384"]\nhmac_keys = [{{ secret = {{ file = "{short}" }} }}]'))
    assert any("shorter than 48 bytes" in m for m in messages), messages


def test_token_endpoint_settings(tmp_path, keys):
    pem = tmp_path / "ec.pem"
    pem.write_bytes(keys.private_pem(keys.ec256))
    messages = errors_of(f"""
        [plugins.auth.token_endpoint]
        issuer = "https://gw"
        signing_keys = [{{ kid = "a", algorithm = "RS256", private_key = {{ file = "{pem}" }} }}]
        [[plugins.auth.token_endpoint.clients]]
        id = "c"
        secret_hash = "sha256:abc"
    """)
    assert any("signing_keys[0].private_key: does not fit RS256" in m for m in messages), messages
    assert any("clients[0].secret_hash: must be scrypt$N$R$P$SALT$HASH" in m for m in messages), messages
    messages = errors_of(f"""
        [plugins.auth.token_endpoint]
        issuer = "https://gw"
        token_path = "/.well-known/jwks.json"
        signing_keys = [{{ kid = "a", algorithm = "ES256", private_key = {{ file = "{pem}" }} }}]
    """)
    assert messages == ["plugins.auth.token_endpoint.token_path: the four paths must be distinct and start with /"]


SETTINGS_CLASSES = (
    plugway_auth.AuthSettings, plugway_auth.IssuerSettings, plugway_auth.PublicKeySettings,
    plugway_auth.HmacKeySettings, plugway_auth.ApiKeySettings, plugway_auth.TokenEndpointSettings,
    plugway_auth.SigningKeySettings, plugway_auth.ClientSettings,
)


def test_the_readme_documents_every_setting_with_its_default():
    text = README.read_text()
    for cls in SETTINGS_CLASSES:
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in text, f"{cls.__name__}.{field.name} is not in the README"


EXAMPLE = README.parent.parent.parent / "conf" / "examples" / "auth.toml"


def test_the_example_token_endpoint_block_passes_check_once_uncommented(tmp_path, keys):
    """The block is commented out because it needs a private key; it must stay valid."""
    text = EXAMPLE.read_text()
    start, end = text.index("# [[routes]]"), text.index("# --- end of the token endpoint")
    block = [line[2:] if line.startswith("# ") else "" for line in text[start:end].splitlines()]
    signing = tmp_path / "gateway-es256.pem"
    signing.write_bytes(keys.private_pem(keys.ec256))
    config = tmp_path / "auth.toml"
    config.write_text(text[:start] + "\n".join(block).replace("/etc/plugway/gateway-es256.pem", str(signing)))
    result = subprocess.run([PLUGWAY, "check", "-c", str(config)], capture_output=True, text=True,
                            cwd=EXAMPLE.parent.parent.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "plugins: auth, ratelimit" in result.stdout
