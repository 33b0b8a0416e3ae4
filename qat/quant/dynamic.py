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

Every grid runs on rows that share one scale (the tensor, a token, a block). In training, a
large float32 activation takes one ``torch.compile``d kernel over its rows
(:data:`qat.quant.fake_quant.fused`), bitwise the eager ops; eagerly the reductions, the scale
and the rounding were some ten passes over the activation.
"""

from __future__ import annotations

import torch

from qat.quant.blocks import GGUF_BLOCK, gguf_round_trip
from qat.quant.fake_quant import as_rows, eager_kernel, fused, kernel_constants
from qat.quant.qparams import qrange
from qat.quant.spec import QuantSpec


def _qparams(lo, hi, qmin, qmax, symmetric: bool, signed: bool, zero=0.0):  # type: ignore[no-untyped-def]
    """Scale and (float, integer-valued) zero point from the ranges ``lo`` / ``hi`` (already
    widened to include 0); ``qmin`` / ``qmax`` are numbers or 0-dim float32 tensors holding
    them, which every operation meets alike, and so is ``zero``, the symmetric zero point: a
    compiled kernel takes it as a tensor, which the compiler cannot fold away as it would a
    constant (eager's ``−0.0 + 0.0`` is ``+0.0``)."""
    if symmetric:
        amax = torch.maximum(-lo, hi) if signed else hi
        scale = amax / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale) + zero
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(hi == lo, torch.ones_like(scale), scale)
    zero_point = torch.round((qmin - lo / scale).clamp(qmin, qmax))
    return scale, zero_point


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
    return _qparams(lo, hi, float(qmin), float(qmax), symmetric, qmin < 0)


def _dynamic_rows(rows, qmin, qmax, zero, cfg):  # type: ignore[no-untyped-def]
    """Each row of ``rows`` ``(N, K)`` on its own dynamic grid: the kernel of
    :func:`dynamic_quantize`, eager or compiled (``qmin`` / ``qmax`` / ``zero`` 0-dim float32
    tensors; for ``q8_0``, ``qmax`` is 127). ``cfg``: ``(grid, symmetric, signed)``."""
    grid, symmetric, signed = cfg
    if grid == "q8_0":
        return gguf_round_trip(rows, "q8_0", qmax)
    lo = torch.amin(rows, dim=1, keepdim=True).clamp(max=0.0)
    hi = torch.amax(rows, dim=1, keepdim=True).clamp(min=0.0)
    scale, zp = _qparams(lo, hi, qmin, qmax, symmetric, signed, zero)
    q = torch.clamp(torch.round(rows / scale) + zp, qmin, qmax)
    return (q - zp) * scale


_dynamic_rows_eager = eager_kernel(_dynamic_rows)


def _row_length(x: torch.Tensor, spec: QuantSpec) -> int:
    """The length of the rows that share one grid: the tensor, a token or a block."""
    if spec.grid == "q8_0":
        size = GGUF_BLOCK
    elif spec.dynamic == "tensor":
        return x.numel()
    else:
        size = spec.group_size or x.shape[-1]
    if x.shape[-1] % size:
        raise ValueError(
            f"dynamic activation blocks of {size} do not divide the last dimension "
            f"{x.shape[-1]} of an input {tuple(x.shape)}: use group_size=0 or a divisor"
        )
    return size


def _kernel_args(x: torch.Tensor, spec: QuantSpec) -> tuple:
    """``(qmin, qmax, zero, cfg)`` for :func:`_dynamic_rows`."""
    if spec.grid == "q8_0":
        qmin, qmax = -127, 127
    else:
        qmin, qmax = qrange(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)
    constants = kernel_constants((qmin, qmax, 0.0), torch.float32, x.device)
    return (*constants, (spec.grid, spec.symmetric, qmin < 0))


def dynamic_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` on the dynamic grid ``spec`` describes (no gradient; see the module docstring)."""
    x = x.detach()
    rows = x.reshape(-1, _row_length(x, spec))
    if spec.grid == "q8_0":
        rows = rows.float()
    return _dynamic_rows_eager(rows, *_kernel_args(x, spec)).reshape(x.shape)


def _fused_dynamic_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """:func:`dynamic_quantize` as one compiled kernel over ``x``'s rows, bitwise the same
    (``tests/quant/test_llm_numerics.py``)."""
    x = x.detach().contiguous()
    rows = as_rows(x, x.numel() // _row_length(x, spec))
    out = fused.run(_dynamic_rows, _dynamic_rows_eager, rows, *_kernel_args(x, spec))
    return out.view(x.shape)


class _DynamicFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):  # type: ignore[override]
        if x.dtype == torch.float32 and not torch.compiler.is_compiling() and fused.takes(x):
            return _fused_dynamic_quantize(x, spec)
        return dynamic_quantize(x, spec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def dynamic_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """:func:`dynamic_quantize` with a straight-through (identity) gradient."""
    return _DynamicFakeQuantize.apply(x, spec)
