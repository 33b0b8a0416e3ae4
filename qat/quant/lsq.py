"""LSQ: fake quantization with a learned step size (Esser et al., 2020).

``lsq_fake_quantize`` is :func:`qat.quant.fake_quant.fake_quantize` plus LSQ's scale gradient,
with its gradient scale ``g``: ``∂x̂/∂s = round(x/s) − x/s`` inside the range, ``qmin − z``
below, ``qmax − z`` above, and, for a learned zero point (LSQ+), ``∂x̂/∂z = −s`` outside the
range, 0 inside.
"""

from __future__ import annotations

import torch

from qat.quant.fake_quant import (
    _broadcast,
    _fake_quant_only,
    _fake_quant_only_eager,
    _grid,
    _in_range_mask,
    dense,
    eager_kernel,
    from_memory_view,
    fused,
    memory_view,
)


def _reduce_to(grad: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return grad.sum().reshape(1)
    dims = [d for d in range(x.dim()) if d != axis]
    return grad.sum(dim=dims)


def _lsq_grads(grad, x, scale, zero_point, qmin, qmax, zp_grad):  # type: ignore[no-untyped-def]
    """LSQ's backward in one pass over a per-tensor ``x``: ``(∂L/∂x, Σ ∂L/∂x̂ · ∂x̂/∂s,
    Σ ∂L/∂x̂ · ∂x̂/∂z or None)``, the sums before the gradient scale (see _LSQFakeQuantize)."""
    v = x * (1.0 / scale)
    q = torch.round(v) + zero_point
    clamped = torch.clamp(q, qmin, qmax)
    mask = torch.where(clamped == q, 1.0, 0.0)
    grad_x = grad * mask
    grad_s = (grad * ((clamped - zero_point) - v * mask)).sum()
    grad_z = (grad * (1.0 - mask) * (-scale)).sum() if zp_grad else None
    return grad_x, grad_s, grad_z


_lsq_grads_eager = eager_kernel(_lsq_grads)


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ. A large per-tensor activation takes the compiled kernels: the forward is the fused
    fake quantization, and the backward recomputes the mask and ``∂x̂/∂s`` from the saved input
    in one pass (the eager path saves both, 8 bytes per element, and runs ~10 passes). Values
    and ``∂L/∂x`` are bitwise the eager ones; the scale's and zero point's gradients are sums,
    taken in another order (float32 rounding apart)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):  # type: ignore[override]
        s = _broadcast(scale, x, axis)
        z_int = torch.round(zero_point).clamp(qmin, qmax)
        z = _broadcast(z_int.to(x.dtype), x, axis)
        ctx.axis, ctx.grad_factor, ctx.zp_grad = axis, grad_factor, zero_point.requires_grad
        ctx.fused = (
            axis is None
            and x.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and fused.takes(x)
        )
        if ctx.fused:
            x = dense(x.detach())
            lo, hi = _grid(qmin, qmax, x)
            s, z = s.detach().clone(), z.detach().clone()
            args = (memory_view(x), s, z, lo, hi)
            out = from_memory_view(fused.run(_fake_quant_only, _fake_quant_only_eager, *args), x)
            ctx.layout = (tuple(x.shape), x.stride())
            ctx.save_for_backward(x, s, z, lo, hi)
            return out
        v = x * (1.0 / s)
        q = torch.round(v).add_(z)
        clamped = q.clamp(qmin, qmax)
        mask = _in_range_mask(clamped, q)
        # ∂x̂/∂s per element: round(v) − v inside, qmin − z below, qmax − z above, i.e.
        # (clamp(q) − z) − v inside and (clamp(q) − z) outside.
        dqds = (clamped - z).sub_(v.mul_(mask))
        ctx.save_for_backward(mask, dqds, s)
        return clamped.sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.fused:
            x, s, z, lo, hi = ctx.saved_tensors
            grad_x, sum_s, sum_z = fused.run_on_layout(
                _lsq_grads, _lsq_grads_eager, grad, ctx.layout, memory_view(x), s, z, lo, hi,
                ctx.zp_grad,
            )  # fmt: skip
            g = ctx.grad_factor
            grad_z = sum_z.reshape(1) * g if ctx.zp_grad else None
            return grad_x, sum_s.reshape(1) * g, grad_z, None, None, None, None
        mask, dqds, s = ctx.saved_tensors
        axis, g = ctx.axis, ctx.grad_factor
        ref = grad  # same shape as x, for the reductions
        grad_x = grad * mask
        grad_s = _reduce_to(grad * dqds, ref, axis) * g
        grad_z = None
        if ctx.zp_grad:
            grad_z = _reduce_to(grad * (1.0 - mask) * (-s), ref, axis) * g
        return grad_x, grad_s, grad_z, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize with LSQ gradients for ``scale`` (and ``zero_point`` if it requires grad).

    The zero point is rounded to an integer and clamped to ``[qmin, qmax]`` in the forward pass.
    """
    return _LSQFakeQuantize.apply(x, scale, zero_point.float(), qmin, qmax, axis, grad_factor)
