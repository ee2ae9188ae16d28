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
