"""The integer codes and per-group scales of a quantized linear / Conv1D / embedding weight.

Read from the trained quantizer, never re-derived from a range: GGUF grids take their codes
from the float32 ``d`` and their scales as the fp16 ``d`` a file stores; affine grids round
``w · (1/s)`` as the fake quantizer does. The language-model exporters write these
(:mod:`qat.export.lm_weights`, which checks ``codes · scales`` against the fake-quant weight)
and :mod:`qat.quant.runtime_matmul` computes with them.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.blocks import fp16_scale, gguf_codes, group_view
from qat.quant.layers import QConv1D

__all__ = ["weight_codes", "weight_rows"]


def weight_rows(layer: nn.Module) -> torch.Tensor:
    """The float weight as ``(output features or entries, in)`` (Conv1D stores it transposed)."""
    w = layer.weight.detach().float()
    return w.t() if isinstance(layer, QConv1D) else w


@torch.no_grad()
def weight_codes(
    layer: nn.Module, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """``(codes, scales, group, d32)`` of ``layer``'s quantized weight.

    Returns:
        codes ``(rows, in)`` float, integer-valued; scales ``(rows, in // group)`` float32;
        the group size (``in`` for per-channel weights); for GGUF grids the float32 ``d`` the
        codes were computed with, ``(rows · groups,)`` (else None).

    Raises:
        ValueError: an affine grid with a zero point, or scales that fit no group layout.
    """
    q = layer.weight_quant
    spec = q.spec
    rows = weight_rows(layer)
    group = spec.group_size or rows.shape[1]
    view = group_view(rows, group, 1)  # (rows · groups, group)
    scale, zero_point = q.qparams()
    if spec.grid != "affine":
        d32 = scale.float()
        codes, scales = gguf_codes(view, d32, spec.grid), fp16_scale(d32)
    else:
        d32 = None
        where = name or type(layer).__name__
        qmin, qmax = q.quant_range
        s = scale.float().reshape(-1)
        if s.numel() == 1:
            s = s.expand(view.shape[0])
        elif not spec.group_size and s.numel() != view.shape[0]:
            raise ValueError(f"layer {where!r}: {s.numel()} weight scales for {rows.shape}")
        if bool((zero_point != 0).any()):
            raise ValueError(f"layer {where!r}: weights must be symmetric (zero point 0)")
        codes = torch.clamp(torch.round(view * (1.0 / s[:, None])), qmin, qmax)
        scales = s
    n_groups = rows.shape[1] // group
    return codes.reshape(rows.shape), scales.reshape(rows.shape[0], n_groups), group, d32
