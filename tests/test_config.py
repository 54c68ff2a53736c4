import subprocess
import textwrap
from pathlib import Path

import pytest

from gateway import config
from gateway.config import ConfigErrors
from gateway.config.starter import starter_config
from gateway.config.units import Duration, Rate, Size
from gateway.plugins import load_plugins

from support import PLUGWAY, ROOT


@pytest.mark.parametrize("text, seconds, rendered", [
    ("500ms", 0.5, "500ms"), ("30s", 30, "30s"), ("5m", 300, "5m"), ("1h", 3600, "1h"), ("90s", 90, "90s"),
    ("1.5s", 1.5, "1500ms"), ("2d", 172800, "2d"),
])
def test_durations_parse_and_render_back(text, seconds, rendered):
    value = Duration(text)
    assert value == seconds
    assert str(value) == rendered
    assert Duration(str(value)) == value


@pytest.mark.parametrize("text, size, rendered", [
    ("10MiB", 10 * 1024**2, "10MiB"), ("64KiB", 65536, "64KiB"), ("1GB", 10**9, "1000000000B"), (512, 512, "512B"),
])
def test_sizes_parse_and_render_back(text, size, rendered):
    assert Size(text) == size
    assert str(Size(text)) == rendered


@pytest.mark.parametrize("text, count, period", [("100/m", 100, 60), ("10/s", 10, 1), ("5/15m", 5, 900)])
def test_rates(text, count, period):
    rate = Rate(text)
    assert (rate.count, rate.period) == (count, period)
    assert Rate(str(rate)) == rate


@pytest.mark.parametrize("bad", ["10", "ten seconds", "5x", "-1s"])
def test_bad_durations_say_why(bad):
    with pytest.raises(ValueError):
        Duration(bad)


BAD = """
[server]
listen = ["0.0.0.0:8080"]
workers = 0
client_max_body = "10XB"
colour = "blue"

[[upstreams]]
name = "users"
targets = [{ url = "http://127.0.0.1:9001" }]
connect_timeout = "soon"

[[routes]]
name = "a"
prefix = "/a"
upstream = "users"

[[routes]]
name = "b"
prefix = "/b"
upstream = "user"
"""


def test_every_error_is_reported_with_its_toml_path():
    with pytest.raises(ConfigErrors) as caught:
        config.loads(BAD)
    messages = [str(error) for error in caught.value.errors]
    assert 'server.workers: must be "auto" or a positive integer, not 0' in messages
    assert any(m.startswith("server.client_max_body: '10XB' has an unknown unit") for m in messages)
    assert any(m.startswith("server.colour: unknown key") for m in messages)
    assert any(m.startswith("upstreams[0].connect_timeout:") for m in messages)


def test_a_route_naming_a_missing_upstream_is_refused_with_its_path():
    text = BAD.replace("workers = 0\n", "").replace('client_max_body = "10XB"\n', "").replace('colour = "blue"\n', "")
    text = text.replace('connect_timeout = "soon"\n', "")
    with pytest.raises(ConfigErrors) as caught:
        config.loads(text)
    assert [str(e) for e in caught.value.errors] == ['routes[1].upstream: unknown upstream "user"']


@pytest.mark.parametrize("route, message", [
    ('prefix = "api"', "routes[0].prefix: 'api': the path must start with /"),
    ('path = "/users/{id}x"', "routes[0].path: '/users/{id}x': a placeholder must be a whole segment, as /users/{id}"),
    ('prefix = "/a"\npath = "/b"', 'routes[0]: needs exactly one of "prefix" or "path"'),
    ('prefix = "/a/../.."', "routes[0].prefix: '/a/../..': the path climbs above the root"),
    ('prefix = "/a"\nmethods = ["get"]', "routes[0].methods: 'get' is not an upper-case HTTP method"),
])
def test_route_errors(route, message):
    text = f"""
    [[upstreams]]
    name = "u"
    targets = [{{ url = "http://127.0.0.1:1" }}]
    [[routes]]
    name = "r"
    upstream = "u"
    {route}
    """
    with pytest.raises(ConfigErrors) as caught:
        config.loads(textwrap.dedent(text))
    assert message in [str(e) for e in caught.value.errors]


def test_config_show_parses_back_to_the_same_configuration(tmp_path):
    source = ROOT / "conf" / "plugway.toml"
    shown = subprocess.run([PLUGWAY, "config", "show", "-c", str(source)], capture_output=True, text=True, check=True)
    original = config.load(source)
    again = config.loads(shown.stdout)
    assert config.dumps(again) == config.dumps(original)
    assert "keepalive_timeout" in shown.stdout  # defaults are filled in
    reshown_path = tmp_path / "shown.toml"
    reshown_path.write_text(shown.stdout)
    assert load_plugins(again).rendered(again) == load_plugins(original).rendered(original)


def test_check_prints_one_line_and_exits_zero_for_a_valid_file():
    result = subprocess.run([PLUGWAY, "check", "-c", str(ROOT / "conf" / "plugway.toml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert "is valid" in result.stdout


def test_check_lists_core_and_plugin_errors_together_and_exits_two(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD + '\n[plugins.sample]\ntag = 5\n[plugins.nosuch]\n')
    result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "server.workers" in result.stderr
    assert "server.colour: unknown key" in result.stderr
    assert "plugins.sample.tag: must be a string" in result.stderr
    assert 'plugins.nosuch: no plugin named "nosuch"' in result.stderr


def test_plugin_errors_carry_their_paths(tmp_path):
    text = """
    [[upstreams]]
    name = "u"
    targets = [{ url = "http://127.0.0.1:1" }]
    [[routes]]
    name = "r"
    prefix = "/"
    upstream = "u"
    [routes.plugins.sample]
    tga = "x"
    [plugins.sample]
    tag = 5
    [plugins.nosuch]
    """
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "plugins.sample.tag: must be a string, not the number 5" in result.stderr
    assert "routes[0].plugins.sample.tga: unknown key" in result.stderr
    assert 'plugins.nosuch: no plugin named "nosuch" is installed' in result.stderr


def test_init_writes_a_commented_config_that_passes_check(tmp_path):
    path = tmp_path / "new.toml"
    subprocess.run([PLUGWAY, "init", "-o", str(path)], check=True)
    text = path.read_text()
    assert "# Longest single header line" in text
    result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert starter_config() == text


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("**/*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_check(path: Path):
    result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_secrets_come_from_the_environment_or_a_file_and_never_show(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from gateway import Secret, setting
    from gateway.config.schema import ConfigError, parse_settings, render_settings

    @dataclass(frozen=True)
    class WithSecret:
        key: Secret = setting(doc="a secret")

    monkeypatch.setenv("PLUGWAY_TEST_SECRET", "s3cret")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    errors: list[ConfigError] = []
    from_env = parse_settings(WithSecret, {"key": {"env": "PLUGWAY_TEST_SECRET"}}, "plugins.x", errors)
    from_file = parse_settings(WithSecret, {"key": {"file": str(key_file)}}, "plugins.x", errors)
    assert errors == []
    assert (from_env.key.value, from_file.key.value) == ("s3cret", "from-file")
    assert render_settings(from_env) == {"key": {"env": "PLUGWAY_TEST_SECRET"}}
    assert "s3cret" not in repr(from_env)
    for raw, reason in (("inline", "secrets never go in the file"), ({"env": "PLUGWAY_UNSET_VARIABLE"}, "is not set"),
                        ({"file": str(tmp_path / "missing")}, "cannot read")):
        errors = []
        parse_settings(WithSecret, {"key": raw}, "plugins.x", errors)
        assert len(errors) == 1 and errors[0].path == "plugins.x.key" and reason in errors[0].reason
