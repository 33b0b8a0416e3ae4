"""Fixtures of the application tests: each composes the real configs with a clean Hydra."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
