"""``SeparableResize``: ``F.interpolate`` (bilinear / bicubic) as per-axis taps.

ONNX Runtime's ``Resize`` computes its own coefficients: on a 240 → 224 bicubic resize
(CrossViT's second branch) its outputs were up to 1.4e-4 off torch's, hundreds of float32
ulps, and the next grid's codes flipped (CrossViT: 62% top-1 agreement); a ``MatMul`` by the
resize matrices still differs from torch's ``matmul`` in the last ulp. Written as gathers,
multiplies and adds in a fixed order, the resize computes the same bits in torch, TorchScript
and ONNX Runtime (each op is one IEEE rounding, none fused). The island then runs it in
training too: the weights are torch's own, read off its kernel (one-hot rows and columns
through the call), so it is torch's resize to within an ulp.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.layers.functional import FunctionalOp

__all__ = ["SeparableResize", "is_separable_resize"]


def is_separable_resize(op: FunctionalOp) -> bool:
    """A bilinear / bicubic ``F.interpolate`` of a 4-D input without antialiasing."""
    if op.target is not F.interpolate:
        return False
    mode = op.kwargs.get("mode", op.args[3] if len(op.args) > 3 else "nearest")
    return mode in ("bilinear", "bicubic") and not op.kwargs.get("antialias", False)


def _taps(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A resize matrix (out, in) as ``(index, weight)``, each (taps, out): per output, the
    inputs it reads and their weights, in input order; padded with weight-0 taps."""
    rows = [torch.nonzero(r).flatten() for r in matrix]
    n = max(1, max(len(r) for r in rows))
    index = torch.zeros(n, len(rows), dtype=torch.long)
    weight = torch.zeros(n, len(rows))
    for i, r in enumerate(rows):
        index[: len(r), i], weight[: len(r), i] = r, matrix[i, r]
        index[len(r) :, i] = r[0] if len(r) else 0
    return index, weight


def _along(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    y = x.index_select(dim, index[0]) * weight[0].reshape(shape)
    for k in range(1, index.shape[0]):
        y = y + x.index_select(dim, index[k]) * weight[k].reshape(shape)
    return y


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple | list):
        return type(value)(_plain(v) for v in value)
    return value


class SeparableResize(nn.Module):
    """``op`` (a bilinear / bicubic ``F.interpolate`` call) along the columns, then the rows,
    with the taps of torch's kernel for each input size (computed once per size)."""

    def __init__(self, op: FunctionalOp) -> None:
        super().__init__()
        self.op = op
        self._cache: dict[Any, tuple] = {}

    def _taps_for(self, h: int, w: int, rest: tuple) -> tuple:
        rest = _plain(rest)  # an image size an exporter traced: its Python value
        key = (h, w, repr(rest))
        if key not in self._cache:
            # Constants of the traced graph, not ops in it (torch's exporter died on their
            # slice writes): built with tracing off.
            state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)
            try:
                self._cache[key] = self._build(h, w, rest)
            finally:
                torch._C._set_tracing_state(state)
        return self._cache[key]

    @torch.no_grad()
    def _build(self, h: int, w: int, rest: tuple) -> tuple:
        rows = torch.eye(h).reshape(h, 1, h, 1).expand(h, 1, h, w).contiguous()
        cols = torch.eye(w).reshape(w, 1, 1, w).expand(w, 1, h, w).contiguous()
        a_h = self.op(rows, *rest)[:, 0, :, 0].t()  # (H_out, H): row j's response
        a_w = self.op(cols, *rest)[:, 0, 0, :].t()
        return (*_taps(a_h), *_taps(a_w))

    def forward(self, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        if x.dim() != 4:
            return self.op(x, *rest)
        h_index, h_weight, w_index, w_weight = self._taps_for(
            int(x.shape[2]), int(x.shape[3]), rest
        )
        dtype = x.dtype
        y = _along(x, w_index.to(x.device), w_weight.to(x.device, dtype), 3)
        return _along(y, h_index.to(x.device), h_weight.to(x.device, dtype), 2)

    def extra_repr(self) -> str:
        return repr(self.op.kwargs)
