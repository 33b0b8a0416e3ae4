"""Adaptive average pooling to a fixed size other than 1×1, in ops every ONNX runtime has.

torch's ONNX exporter writes ``adaptive_avg_pool2d`` only where each output cell pools an
equal, non-overlapping window it can read from the traced shapes; a float island (whose input
comes out of a custom quantize op, with no shape) and windows of unequal size (CSATv2 pools
8×8, 4×4 and 2×2 maps to 7×7) fail. The island knows its input shape from the example run, so
the pooling is written out: per window offset a ``Gather`` of rows and of columns, masked where
a cell's window is shorter, summed in torch's order (rows, then columns within a row) and
divided as torch's kernel divides. Adding an exact zero changes no sum, so the result is
bitwise torch's (``tests/export/test_timm_patterns.py`` checks it).
"""

from __future__ import annotations

import torch

__all__ = ["adaptive_avg_pool2d_unrolled", "windows"]


def windows(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each output cell's window, as torch's adaptive pooling computes them."""
    return [
        ((i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)) for i in range(size_out)
    ]


def _offsets(size_in: int, size_out: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output cell, the input index at ``offset`` in its window (clamped) and 1.0 where
    that index is inside the window (else 0.0)."""
    spans = windows(size_in, size_out)
    index = torch.tensor([min(s + offset, e - 1) for s, e in spans], dtype=torch.long)
    inside = torch.tensor([float(s + offset < e) for s, e in spans])
    return index, inside


def adaptive_avg_pool2d_unrolled(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` (NCHW, static spatial sizes) from gathers,
    multiplies, adds and divides: bitwise the same values."""
    (h, w), (oh, ow) = x.shape[-2:], output_size
    rows, cols = windows(h, oh), windows(w, ow)
    kh = max(e - s for s, e in rows)
    kw = max(e - s for s, e in cols)
    total: torch.Tensor | None = None
    for dy in range(kh):
        r_index, r_inside = _offsets(h, oh, dy)
        xr = x.index_select(-2, r_index)
        for dx in range(kw):
            c_index, c_inside = _offsets(w, ow, dx)
            term = xr.index_select(-1, c_index) * (r_inside[:, None] * c_inside[None, :])
            total = term if total is None else total + term
    assert total is not None
    height = torch.tensor([float(e - s) for s, e in rows])[:, None]
    width = torch.tensor([float(e - s) for s, e in cols])[None, :]
    return total / height / width
