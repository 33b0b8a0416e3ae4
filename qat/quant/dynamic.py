"""Dynamic activation quantization: scales from each call's own values (no observed state).

Per ``tensor`` (ONNX Runtime's ``DynamicQuantizeLinear``), per ``token`` (each row of the last
dimension; torchao's 8da4w activations) or per block of a token (``group_size``; with the
``q8_0`` grid, what llama.cpp does to the activations of every Q4_0 / Q8_0 matmul). The affine
formula is ONNX's, so that the exported graph computes it exactly::

    lo, hi = min(0, min x), max(0, max x)        # over the tensor, the token or the block
    s = (hi − lo) / (qmax − qmin)   (1 where hi == lo)
    z = round(clamp(qmin − lo / s, qmin, qmax))  # symmetric: s = max(|lo|, hi) / qmax, z = 0
    x̂ = (clamp(round(x / s) + z, qmin, qmax) − z) · s

Division by ``s`` (not the reciprocal multiply of the static grids), round half to even: as
ONNX Runtime's ``MlasQuantizeLinear`` computes it. The range covers every value, so nothing
clips and the straight-through gradient is the identity.
"""

from __future__ import annotations

import torch

from qat.quant.blocks import GGUF_BLOCK, gguf_quantize_reference
from qat.quant.qparams import qrange
from qat.quant.spec import QuantSpec


def dynamic_qparams(
    x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float, integer-valued) zero point over ``dim`` (None: the whole tensor),
    with the reduced dimension kept so both broadcast against ``x``."""
    if dim is None:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.reshape([1] * x.dim()), hi.reshape([1] * x.dim())
    else:
        lo, hi = torch.aminmax(x.detach(), dim=dim, keepdim=True)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi) if qmin < 0 else hi
        scale = amax / float(qmax)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / float(qmax - qmin)
    scale = torch.where(hi == lo, torch.ones_like(scale), scale)
    zero_point = torch.round((qmin - lo / scale).clamp(qmin, qmax))
    return scale, zero_point


def dynamic_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` on the dynamic grid ``spec`` describes (no gradient; see the module docstring)."""
    x = x.detach()
    if spec.grid == "q8_0":
        return gguf_quantize_reference(_blocks(x, GGUF_BLOCK), "q8_0").reshape(x.shape)
    qmin, qmax = qrange(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)
    shape = x.shape
    if spec.dynamic == "tensor":
        v, dim = x, None
    else:
        v, dim = (_blocks(x, spec.group_size) if spec.group_size else x), -1
    scale, zp = dynamic_qparams(v, qmin, qmax, spec.symmetric, dim)
    q = torch.clamp(torch.round(v / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).reshape(shape)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(
            f"dynamic activation blocks of {size} do not divide the last dimension "
            f"{x.shape[-1]} of an input {tuple(x.shape)}: use group_size=0 or a divisor"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


class _DynamicFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):  # type: ignore[override]
        return dynamic_quantize(x, spec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def dynamic_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """:func:`dynamic_quantize` with a straight-through (identity) gradient."""
    return _DynamicFakeQuantize.apply(x, spec)
