"""Peak memory of the run: the process's resident set (CPU) and CUDA's allocator high mark."""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["peak_memory"]


def peak_memory() -> dict[str, int]:
    """``{"cpu_rss_bytes": ..., "cuda_max_allocated_bytes": ...}`` (CUDA only where used).

    CPU: ``getrusage``'s ``ru_maxrss`` of this process (kilobytes on Linux, bytes on macOS):
    the high-water mark of its resident memory since it started, so it includes what Python,
    the libraries and the data took, not only the model. CUDA: ``max_memory_allocated`` of the
    current device since the process started (tensors only, not the allocator's cache).
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out
