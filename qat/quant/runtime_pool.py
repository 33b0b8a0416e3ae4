"""Global average pooling as ONNX Runtime's ``QLinearGlobalAveragePool`` computes it.

ONNX Runtime fuses ``DQ → GlobalAveragePool → Q`` into ``QLinearGlobalAveragePool``, whose x86
kernel (MLAS) sums the stored u8 values of each channel exactly in int32 and requantizes the sum
once, in float32::

    scale = s_in / (s_out · N)                 (N = H · W, each step one float32 rounding)
    C = saturate_u8(round_half_even(float32(Σ A − z_in · N) · scale) + z_out)

The fake-quant model averages the dequantized values in float32 and multiplies by ``1/s_out``,
which picks another level where the mean lies within float32 error of a rounding boundary
(3 of 245,760 random outputs). :func:`qlinear_global_avg_pool_levels` reproduces the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.layers.functional import SLOT, FunctionalOp
from qat.quant.runtime_add import Grid

__all__ = ["is_global_avg_pool", "qlinear_global_avg_pool_levels"]


def is_global_avg_pool(act: nn.Module) -> bool:
    """True for an average pool to 1×1 (``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d``)."""
    if isinstance(act, nn.AdaptiveAvgPool2d):
        size = act.output_size
    elif isinstance(act, FunctionalOp) and act.target is F.adaptive_avg_pool2d:
        if act.args[:1] != (SLOT,):
            return False
        size = act.kwargs.get("output_size", act.args[1] if len(act.args) > 1 else None)
    else:
        return False
    return size == 1 or (isinstance(size, tuple | list) and tuple(size) == (1, 1))


def qlinear_global_avg_pool_levels(levels: torch.Tensor, a: Grid, out: Grid) -> torch.Tensor:
    """Output u8 levels of ``QLinearGlobalAveragePool`` for stored levels ``(N, C, H, W)``.

    Args:
        levels: the input's stored u8 values (any float or integer dtype).
        a: the input's container grid ``(scale, zero point)``.
        out: the output's.

    Returns:
        ``(N, C, 1, 1)`` float32 integers in ``[0, 255]``.
    """
    (sa, za), (sc, zc) = a, out
    n = levels.shape[-1] * levels.shape[-2]
    f32 = torch.float32
    scale = torch.tensor(sa, dtype=f32) / (torch.tensor(sc, dtype=f32) * torch.tensor(n, dtype=f32))
    acc = levels.double().sum(dim=(-2, -1), keepdim=True) - za * n  # exact
    return (torch.round(acc.float() * scale) + zc).clamp_(0, 255)
