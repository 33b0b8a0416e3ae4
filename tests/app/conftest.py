"""Fixtures of the application tests (tests/app): composing the real configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

# The helpers module is imported by name here and by subprocesses (PYTHONPATH=tests/app).
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
