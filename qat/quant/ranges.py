"""Batch ranges for the observers: finiteness checks, percentile and MSE clip search, LSQ cap.

:class:`~qat.quant.quantizer.FakeQuantizer` reduces a tensor to per-channel (or per-tensor)
``(lo, hi)``; min/max and its moving average live there, the searched clips here, and the
bound a batch's min/max puts on a learned LSQ scale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from qat.quant.distributed import is_distributed, reduce_across_ranks
from qat.quant.fake_quant import _grid, dense, eager_kernel, fused, memory_view
from qat.quant.qparams import qparams_from_range

if TYPE_CHECKING:
    from qat.quant.quantizer import FakeQuantizer


def finite_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: every value of ``lo`` and ``hi`` is finite (no host sync)."""
    return torch.isfinite(lo).all() & torch.isfinite(hi).all()


def all_finite(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """:func:`finite_range` as a Python bool."""
    if lo.numel() == 1 and hi.numel() == 1:
        # Per-tensor ranges: two scalar reads cost less than five tensor ops.
        return math.isfinite(lo.item()) and math.isfinite(hi.item())
    return bool(finite_range(lo, hi))


def _sample(flat: torch.Tensor, limit: int = 1 << 18) -> torch.Tensor:
    # Deterministic strided subsample: percentile / MSE search on a few 100k values is
    # accurate enough and keeps calibration fast on large activations.
    step = max(1, flat.shape[1] // limit)
    return flat[:, ::step]


def percentile_range(flat: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(100 − p, p)`` percentiles of a ``(C, N)`` float tensor."""
    sample = _sample(flat)
    p = percentile / 100.0
    q = torch.quantile(sample, torch.tensor([1.0 - p, p], dtype=sample.dtype), dim=1)
    return q[0], q[1]


def mse_range(
    flat: torch.Tensor, qmin: int, qmax: int, symmetric: bool, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clip ``(lo, hi)`` of a ``(C, N)`` float tensor with the least quantization MSE."""
    sample = _sample(flat)
    lo, hi = torch.aminmax(sample, dim=1)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    # Geometric grid of clip ratios: an outlier can make the best clip 1000x below the max.
    for ratio in torch.logspace(-10, 0, 64, base=2.0).tolist():
        c_lo, c_hi = lo * ratio, hi * ratio
        scale, zp = qparams_from_range(c_lo, c_hi, qmin, qmax, symmetric, signed)
        inv = 1.0 / scale[:, None]
        q = torch.clamp(torch.round(sample * inv) + zp[:, None], qmin, qmax)
        err = ((q - zp[:, None]) * scale[:, None] - sample).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


@torch.no_grad()
def cap_lsq_scale(q: FakeQuantizer, x: torch.Tensor, qmin: int, qmax: int, relu: bool) -> None:
    """Keep a learned scale at or below the min/max scale of this batch (a projection).

    A larger step only leaves levels unused, and past twice it every value rounds to zero:
    BN then normalises a constant channel, its gradient is amplified by ``1/√eps`` and the
    scale runs away (ResNet-20 annealed to W2A2 with its 8-bit clip ranges kept: a weight
    scale of 1e15 within 40 steps at 2 bits).
    """
    if _fuses_cap(q, x):
        qmin_t, qmax_t = _grid(qmin, qmax, x)
        args = (memory_view(dense(x.detach())), q.scale.detach(), qmin_t, qmax_t)
        cfg = (q.spec.symmetric, q.spec.signed, relu)
        q.scale.copy_(fused.run(_capped_scale, _capped_scale_eager, *args, cfg))
        return
    lo, hi = q._minmax(x)
    if relu:
        lo, hi = lo.clamp_min(0.0), hi.clamp_min(0.0)
    if torch.compiler.is_compiling() and not is_distributed():
        # No data-dependent branch in a graph: a non-finite batch caps nothing.
        ok = finite_range(lo, hi)
        lo, hi = torch.where(ok, lo, 0.0), torch.where(ok, hi, 0.0)
        cap, _ = qparams_from_range(lo, hi, qmin, qmax, q.spec.symmetric, q.spec.signed)
        q.scale.copy_(torch.where(ok, torch.minimum(q.scale, cap), q.scale))
        return
    finite = all_finite(lo, hi)
    if q.role == "activation":
        # Every rank must cap with the same bound, or the replicas' scales drift apart. A
        # non-finite batch is the loss check's to report; here it only skips the cap.
        if not finite:
            lo, hi = torch.zeros_like(lo), torch.zeros_like(hi)
        finite = reduce_across_ranks(lo, hi, not finite) is None
    if not finite:
        return
    cap, _ = qparams_from_range(lo, hi, qmin, qmax, q.spec.symmetric, q.spec.signed)
    q.scale.copy_(torch.minimum(q.scale, cap))


def _fuses_cap(q: FakeQuantizer, x: torch.Tensor) -> bool:
    """Whether :func:`cap_lsq_scale` takes one compiled pass (a large per-tensor activation in
    one process; under DDP the ranks first agree on the range)."""
    return (
        not q.spec.per_channel
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and not is_distributed()
        and fused.takes(x)
    )


def _capped_scale(x, scale, qmin, qmax, cfg):  # type: ignore[no-untyped-def]
    """:func:`cap_lsq_scale` for one process, as one kernel: ``min(scale, cap)``, or ``scale``
    for a non-finite batch. ``qmin`` / ``qmax`` are 0-dim float32 tensors, which meet every
    operation as :func:`qparams_from_range`'s Python ints do (bitwise the same scale)."""
    symmetric, signed, relu = cfg
    lo, hi = torch.amin(x).float().reshape(1), torch.amax(x).float().reshape(1)
    if relu:
        lo, hi = lo.clamp_min(0.0), hi.clamp_min(0.0)
    cap, _ = qparams_from_range(lo, hi, qmin, qmax, symmetric, signed)
    return torch.where(finite_range(lo, hi), torch.minimum(scale, cap), scale)


_capped_scale_eager = eager_kernel(_capped_scale)
