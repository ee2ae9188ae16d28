"""Shared fixtures: a private LBUILD_HOME per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh lbuild cache directory."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture(autouse=True)
def _no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds in tests never ask a registry (LBUILD_OFFLINE=1): a name that is no stage,
    build context or local image fails the same way with or without a network. The registry
    tests (tests/test_registry_*.py) take it away to reach their loopback registries."""
    monkeypatch.setenv("LBUILD_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Command lines in tests run in their own process, never in an ``lbuild daemon`` the
    machine may have running (tests/test_daemon.py starts its own and names its socket)."""
    monkeypatch.setenv("LBUILD_DAEMON_SOCKET", "")
