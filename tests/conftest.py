"""Shared fixtures. Tests run on CPU, single-threaded where timing does not matter."""

from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared 2-core machine, spinning worker threads turn a busy
# neighbour core into a 10-100x slowdown of every op.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import sys
import time
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


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder with its BPE tokenizer (``save_pretrained``), built once.

    Shared by every test that needs one: copy it before changing anything in it.
    """
    from hf_folder import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # CI's time budget (.ci/run sets it for the slow tests): start no test after the deadline.
    deadline = os.environ.get("QAT_TEST_DEADLINE")
    if deadline and nextitem is not None and time.time() > float(deadline):
        item.session.shouldstop = "QAT_TEST_DEADLINE passed: the CI time budget is spent"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
