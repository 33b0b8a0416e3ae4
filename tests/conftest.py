"""Shared fixtures. Tests run on CPU, single-threaded where timing does not matter."""

from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared 2-core machine, spinning worker threads turn a busy
# neighbour core into a 10-100x slowdown of every op.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import sys
from pathlib import Path

import pytest
import torch

import qat  # noqa: F401  # first: lets torchvision (Lightning and timm import it) load

# Helper modules shared by the test folders (tiny models, config composition, probe callbacks);
# subprocess runs put the same folder on PYTHONPATH.
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
