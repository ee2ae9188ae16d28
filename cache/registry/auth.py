"""Registry credentials, found where Docker and podman keep them.

Order (first hit wins): ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``
(podman's), then ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``).  In a
Docker config a ``credHelpers`` entry for the host wins over ``auths``; otherwise an ``auths``
entry (``auth`` = base64 ``user:password``, or ``identitytoken``), otherwise the
``credsStore`` helper.  Helpers run as ``docker-credential-NAME get`` with the server on
stdin.  A :class:`Credentials` never shows its secrets in ``repr``/``str``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.registry.errors import RegistryError

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an identity (refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __str__(self) -> str:
        return f"Credentials(username={self.username!r})"


def _normalize(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port`` (how Docker matches ``auths`` keys)."""
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.split("/", 1)[0]


def _keys_for(host: str) -> tuple[str, ...]:
    if host in DOCKER_HUB_KEYS:
        return tuple(_normalize(k) for k in DOCKER_HUB_KEYS)
    return (host,)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise RegistryError(f"cannot read credentials file {path}: {e.strerror}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegistryError(f"credentials file {path} is not valid JSON (line {e.lineno})") from e
    return data if isinstance(data, dict) else None


def _from_auths(data: dict[str, Any], host: str, path: Path) -> Credentials | None:
    auths = data.get("auths")
    if not isinstance(auths, dict):
        return None
    wanted = set(_keys_for(host))
    for key, entry in auths.items():
        if _normalize(key) not in wanted or not isinstance(entry, dict):
            continue
        token = entry.get("identitytoken") or ""
        user, password = "", ""
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=False).decode()
            except (binascii.Error, UnicodeDecodeError) as e:
                raise RegistryError(f"{path}: the auth entry for {key} is not base64") from e
            user, sep, password = decoded.partition(":")
            if not sep:
                raise RegistryError(f"{path}: the auth entry for {key} is not user:password")
        elif entry.get("username"):
            user, password = str(entry["username"]), str(entry.get("password", ""))
        if user or token:
            return Credentials(user, password, str(token))
    return None


def helper_get(name: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-NAME`` for ``server``'s credentials (None when it has none)."""
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=60
        )
    except FileNotFoundError as e:
        raise RegistryError(f"credential helper {program} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise RegistryError(f"credential helper {program} did not answer in 60 s") from e
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace").strip()
        if "credentials not found" in out.lower():
            return None
        raise RegistryError(f"credential helper {program} failed (exit {proc.returncode})")
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RegistryError(f"credential helper {program} printed no JSON") from e
    user, secret = str(data.get("Username", "")), str(data.get("Secret", ""))
    if user == "<token>":
        return Credentials(identity_token=secret)
    if not user and not secret:
        return None
    return Credentials(user, secret)


def _docker_config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


def _from_docker_config(host: str) -> Credentials | None:
    path = _docker_config_dir() / "config.json"
    data = _load(path)
    if data is None:
        return None
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _keys_for(host):
            if key in helpers:
                return helper_get(str(helpers[key]), _helper_server(host))
    found = _from_auths(data, host, path)
    if found is not None:
        return found
    store = data.get("credsStore")
    if isinstance(store, str) and store:
        return helper_get(store, _helper_server(host))
    return None


def _helper_server(host: str) -> str:
    return "https://index.docker.io/v1/" if host in DOCKER_HUB_KEYS else host


def credentials_for(host: str) -> Credentials | None:
    """The credentials configured for registry ``host`` (``host[:port]``), or None."""
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    for path in files:
        data = _load(path)
        if data is not None:
            found = _from_auths(data, host, path)
            if found is not None:
                return found
    return _from_docker_config(host)
