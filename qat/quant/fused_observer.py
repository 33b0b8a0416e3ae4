"""One fused kernel for a per-tensor quantizer that observes and quantizes in the same call.

In eager mode a per-tensor min/max or moving-average observer costs two reductions over the
activation and some thirty tensor ops on one-element tensors (moving average, scale, zero point,
the finiteness check), each a dispatch of a few microseconds; on a small transformer that was a
sixth of the W8A8 training step. :func:`observe_fake_quantize` does the same arithmetic in one
``torch.compile``d function: the reductions, the range update and the fake quantization of
``x`` with the new scale. Its numbers are bitwise the eager ones (the scalar math is the same
float32 operations, the moving-average factors are the float32 values the eager ops cast the
Python floats to; ``tests/quant/test_fused_observer.py``), and the state is written back only
after the finiteness check, as :meth:`FakeQuantizer.observe` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qat.quant.distributed import is_distributed
from qat.quant.fake_quant import (
    STE_RELU_ZERO,
    _fake_quant_levels,
    _grid,
    _ste_codes,
    _ste_grad,
    _ste_grad_eager,
    as_rows,
    dense,
    eager_kernel,
    from_memory_view,
    fused,
    kernel_constants,
    memory_view,
)
from qat.quant.qparams import qparams_from_range

if TYPE_CHECKING:
    from qat.quant.quantizer import FakeQuantizer


def _factors(d: float, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``d`` and ``1 − d`` as the float32 values ``t * d`` and ``t * (1.0 − d)`` multiply by,
    and a float32 zero: the symmetric zero point, an input so that the compiler cannot fold
    ``+ 0`` away (eager's ``−0.0 + 0.0`` is ``+0.0``)."""
    return kernel_constants((d, 1.0 - d, 0.0), torch.float32, like.device)


def _observe_quantize(x, min_val, max_val, qmin, qmax, decay, keep, zero, cfg):  # type: ignore[no-untyped-def]
    """FakeQuantizer.observe + _update_qparams_from_stats + the ReLU choice + fake_quantize.

    ``qmin`` / ``qmax`` are 0-dim float32 tensors holding integers, which every operation
    below meets exactly as it meets Python ints (:func:`qat.quant.qparams_from_range`).
    ``cfg`` holds the Python constants the compiled code specializes on (:func:`_config`).
    """
    history, symmetric, signed, axis, relu = cfg
    if axis is None:
        lo, hi = torch.amin(x).float().reshape(1), torch.amax(x).float().reshape(1)
    else:
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1).float()
        lo, hi = torch.amin(flat, dim=1), torch.amax(flat, dim=1)
    ok = torch.isfinite(lo).all() & torch.isfinite(hi).all()
    lo, hi = torch.where(ok, lo, 0.0), torch.where(ok, hi, 0.0)
    if relu != "none":
        lo, hi = lo.clamp_min(0.0), hi.clamp_min(0.0)
    if history == "minmax":
        lo, hi = torch.minimum(min_val, lo), torch.maximum(max_val, hi)
    elif history == "ema":
        lo = min_val * decay + lo * keep
        hi = max_val * decay + hi * keep
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric, signed)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    z = zero if symmetric else zp.to(x.dtype).reshape(shape)
    s = scale.reshape(shape)
    # FakeQuantizer._relu_unless_clamped: the clamp at a zero point of qmin is the ReLU.
    at_qmin = (zp.to(x.dtype) == qmin).all() if relu == "unless_clamped" else ok
    x_in = x
    if relu != "none":
        x = torch.where(at_qmin, x, torch.relu(x)) if relu == "unless_clamped" else torch.relu(x)
    q, clamped = _fake_quant_levels(x, s, z, qmin, qmax)
    out = (clamped - z) * s
    codes = _ste_codes(q, clamped)
    if relu != "none":
        # Where the ReLU ran as its own op, its backward zeroes the gradient at x <= 0.
        ran = at_qmin.logical_not() if relu == "unless_clamped" else True
        codes = torch.where(ran & (x_in <= 0), float(STE_RELU_ZERO), codes)
    return out, codes.to(torch.uint8), lo, hi, scale, zp, ok


_observe_quantize_eager = eager_kernel(_observe_quantize)


def _kernel_view(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, what the compiled kernel reads)``: per tensor, ``x`` made dense and a 1-D view of
    its memory; per channel (axis 0, contiguous), ``(C, K)`` rows of it. One rank whatever the
    layer, so the kernel compiles once per configuration instead of once per rank, layout and
    size-1 dimension, which had reached Dynamo's recompile limit on a small ViT and sent its
    later quantizers to eager code. ``(x, x)`` when no such view exists."""
    if axis is None:
        x = dense(x)
        return x, memory_view(x)
    if axis == 0 and x.is_contiguous() and x.numel() > 0:
        return x, as_rows(x, x.shape[0])
    return x, x


class _ObserveFakeQuantize(torch.autograd.Function):
    """``x̂``; the new range, scale, zero point and finiteness flag go to ``state`` (a list),
    not out as outputs: every output of a custom function costs autograd bookkeeping, and a
    zero gradient made for it in the backward."""

    @staticmethod
    def forward(ctx, x, state, *args):  # type: ignore[override]
        axis = args[-1][3]
        x, view = _kernel_view(x.detach(), axis)
        out, codes, *new_state = fused.run(_observe_quantize, _observe_quantize_eager, view, *args)
        if view is not x:
            out = from_memory_view(out, x)
        state.extend(new_state)
        ctx.per_tensor, ctx.rows = axis is None, view is not x
        ctx.layout = (tuple(x.shape), x.stride())
        ctx.save_for_backward(codes)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (codes,) = ctx.saved_tensors
        if ctx.per_tensor:
            grad_x = fused.backward(grad, codes, ctx.layout)
        elif ctx.rows:  # codes are the kernel's (C, K) rows; grad comes in the layer's shape
            g = as_rows(grad, grad.shape[0]) if grad.is_contiguous() else grad.reshape(codes.shape)
            grad_x = fused.run(_ste_grad, _ste_grad_eager, g, codes).view(grad.shape)
        else:
            grad_x = fused.run(_ste_grad, _ste_grad_eager, grad, codes)
        return (grad_x,) + (None,) * 9


def applies(q: FakeQuantizer, x: torch.Tensor, relu: bool) -> bool:
    """Whether ``q``'s next training call can take the fused kernel."""
    spec = q.spec
    return (
        q.training
        and q.observer_enabled
        and q.fake_quant_enabled
        and not q._reinit_pending
        and spec.learned == "none"
        and spec.grid == "affine"
        and spec.range_method in ("minmax", "ema")
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and fused.takes(x, min_numel=0)
        and not is_distributed()
    )


def _config(q: FakeQuantizer, qmin: int, relu: bool) -> tuple:
    keep_history = q.role == "activation" and q.is_initialized
    history = "none" if not keep_history else q.spec.range_method
    spec = q.spec
    if not relu:
        relu_mode = "none"
    elif qmin != 0 and spec.symmetric:
        relu_mode = "always"
    else:
        relu_mode = "unless_clamped"
    axis = q.axis if spec.per_channel else None
    return history, spec.symmetric, spec.signed, axis, relu_mode


def observe_fake_quantize(
    q: FakeQuantizer, x: torch.Tensor, relu: bool = False
) -> tuple[torch.Tensor, bool]:
    """``(fake-quantized x or relu(x), whether the observed range was finite)``; ``q``'s
    statistics, scale and zero point are updated only when it was (the caller raises
    otherwise)."""
    qmin, qmax = q.quant_range
    lo_t, hi_t = _grid(qmin, qmax, x)
    decay, keep, zero = _factors(q.spec.ema_decay, x)
    state: list[torch.Tensor] = []
    out = _ObserveFakeQuantize.apply(
        x, state, q.min_val, q.max_val, lo_t, hi_t, decay, keep, zero, _config(q, qmin, relu)
    )
    lo, hi, scale, zp, ok = state
    if not bool(ok):
        return out, False
    with torch.no_grad():
        q.min_val.copy_(lo)
        q.max_val.copy_(hi)
        q.scale.copy_(scale)
        q.zero_point.copy_(zp)
    q.initialized = True
    return out, True
