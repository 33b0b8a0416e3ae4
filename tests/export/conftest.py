"""Fixtures of the export tests (helpers live in export_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread (two spinning OpenMP threads on this shared 2-core box
    run 100x slower whenever another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
