"""The supervisor's runtime directory: pid file, status file and the metrics directory.

Default: ``/run/plugway`` as root (systemd's ``RuntimeDirectory=plugway``),
else ``$XDG_RUNTIME_DIR/plugway``, else ``/tmp/plugway-UID``. The status file
is rewritten atomically whenever the supervisor's state changes; the admin
API's ``/status`` and ``plugway status``/``plugway reload`` read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from .config.model import GatewaySettings
from .config.schema import ConfigError, ConfigErrors


class AlreadyRunning(Exception):
    pass


def runtime_dir(settings: GatewaySettings) -> Path:
    return _runtime_dir(settings.server.runtime_dir)


def runtime_dir_of(config_path: str) -> Path:
    """The runtime directory a configuration file names, even when the rest of it is invalid
    (so that the supervisor itself reports why). Raises ConfigErrors if it is not even TOML."""
    try:
        with open(config_path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigErrors([ConfigError("", f"cannot read {config_path}: {exc.strerror}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([ConfigError("", f"{config_path} is not valid TOML: {exc}")]) from None
    server = table.get("server")
    configured = server.get("runtime_dir") if isinstance(server, dict) else None
    return _runtime_dir(configured if isinstance(configured, str) else None)


def _runtime_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/plugway")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg, "plugway") if xdg else Path(tempfile.gettempdir(), f"plugway-{os.geteuid()}")


def pid_path(directory: Path) -> Path:
    return directory / "plugway.pid"


def status_path(directory: Path) -> Path:
    return directory / "status.json"


def store_path(directory: Path) -> Path:
    return directory / "store.sock"


def metrics_path(directory: Path) -> Path:
    return directory / "metrics"


def running_pid(directory: Path) -> int | None:
    """The pid in the pid file if that process is alive."""
    try:
        pid = int(pid_path(directory).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def claim(directory: Path) -> None:
    """Create the directory and write our pid, unless another supervisor is alive there."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    other = running_pid(directory)
    if other is not None and other != os.getpid():
        raise AlreadyRunning(f"another plugway (pid {other}) uses {directory}")
    write_atomically(pid_path(directory), f"{os.getpid()}\n")


def prepare_metrics(directory: Path) -> Path:
    """An empty metrics directory for prometheus-client's multiprocess mode (set before it is imported)."""
    path = metrics_path(directory)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(mode=0o750)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def release(directory: Path) -> None:
    for path in (pid_path(directory), status_path(directory)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_status(directory: Path, status: dict[str, Any]) -> None:
    write_atomically(status_path(directory), json.dumps(status, indent=1, sort_keys=True))


def read_status(directory: Path) -> dict[str, Any] | None:
    return read_json(status_path(directory))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
