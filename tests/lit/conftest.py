"""Fixtures of the application tests: each composes the real configs with a clean Hydra."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra
from lit_helpers import write_fake_fashion


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def fashion_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``data.data_dir=<tiny Fashion-MNIST>``: tests of the default data need no real files."""
    return f"data.data_dir={write_fake_fashion(tmp_path_factory.mktemp('fashion'))}"
