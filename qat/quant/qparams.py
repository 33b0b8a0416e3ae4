"""Integer grids and the scale / zero point that cover a range (the affine numerics contract).

``q = clamp(round(x · (1/s)) + z, qmin, qmax)``, ``x̂ = (q − z) · s`` (DESIGN.md, "The numerics
contract"). These helpers are shared by the quantizer, its observers and the exporters.
"""

from __future__ import annotations

import torch

#: Smallest scale a quantizer will use; a zero / negative / non-finite scale falls back to 1.0.
SCALE_EPS = torch.finfo(torch.float32).eps


def qrange(
    bits: int, signed: bool, narrow_range: bool = False, reduce_range: bool = False
) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` for a bit width (at most 7 bits with ``reduce_range``)."""
    if reduce_range:
        bits = min(bits, 7)
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow_range else -qmax - 1), qmax
    return 0, 2**bits - 1


def guard_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero / negative / NaN / inf scales by 1.0 and clamp tiny ones to ``SCALE_EPS``.

    A zero range (a dead channel, an all-zero tensor) quantizes to 0 with any scale; 1.0 keeps
    the int32 bias of such a channel far from overflow at export.
    """
    bad = ~torch.isfinite(scale) | (scale <= 0)
    return torch.where(bad, torch.ones_like(scale), scale.clamp_min(SCALE_EPS))


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int | torch.Tensor,
    qmax: int | torch.Tensor,
    symmetric: bool,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[min_val, max_val]`` (always including 0).

    ``qmin`` / ``qmax`` are ints, or 0-dim float32 tensors holding them (what the compiled
    kernels take, so that a bit-width change does not recompile them): the same values either
    way.
    """
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    if symmetric:
        amax = torch.maximum(-min_val, max_val) if signed else max_val
        scale = guard_scale(amax / qmax)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = guard_scale((max_val - min_val) / (qmax - qmin))
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point
