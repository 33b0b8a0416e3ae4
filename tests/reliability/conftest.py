"""Fixtures of the reliability tests: the application helpers (tests/app) and a clean Hydra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

# Config composition and probe callbacks live in tests/app/app_helpers.py; reuse them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
