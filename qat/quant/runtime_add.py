"""The residual add as the integer runtimes' kernels compute it, on the stored u8 values.

ONNX Runtime fuses ``DQ(a), DQ(b) → Add → Q`` into ``QLinearAdd``, whose x86 kernel (MLAS,
AVX2 with FMA) does not dequantize, add and divide. On the stored u8 values ``A``, ``B`` it
computes, in float32 with two fused multiply-adds::

    r_a = s_a / s_c,  r_b = s_b / s_c
    fixed = z_c − fma(r_a, z_a, r_b · z_b)
    t = fma(A, r_a, fma(B, r_b, fixed))
    C = saturate_u8(round_half_even(t))

PyTorch's ``quantized::add`` (``add_relu``; every engine, vectorized) dequantizes each input
with one fused multiply-add on a premultiplied zero point, adds, and quantizes with the
reciprocal scale::

    a = fma(s_a, A, s_a · (−z_a)),  b = fma(s_b, B, s_b · (−z_b))
    C = saturate_u8(round_half_even(max(a + b, 0 if ReLU) · (1 / s_c)) + z_c)

The fake-quant model's ``round((a + b) · (1/s_c))`` with ``a = (A − z_a) · s_a`` picks another
level wherever the sum lies within float32 error of a rounding boundary (about 1 in 10^5
outputs, enough to move a deep network's top-1 on some images).
:func:`qlinear_add_levels` and :func:`quantized_add_levels` reproduce the kernels instead: each
float32 product is exact in float64 (8-bit integer × 24-bit mantissa) and so is each sum of
such a product and a float32 (they span well under 53 bits), so rounding the float64 result to
float32 once is the FMA's single rounding.

``quantized::add`` computes the last elements of each thread's share of the tensor (fewer
than 128, after the vectorized part) with the plain ``(A − z_a) · s_a`` instead; those follow
the thread count at run time, and are not reproduced.
"""

from __future__ import annotations

import torch

__all__ = ["Grid", "qlinear_add_levels", "quantized_add_levels"]

#: ``(scale, zero point)`` of a u8 container grid (:class:`qat.quant.grids.ActGrid`).
Grid = tuple[float, int]


def _f32(x: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32 ``x · y + z`` rounded once (see the module docstring)."""
    return (x.double() * y.double() + z.double()).float()


def qlinear_add_levels(
    a_levels: torch.Tensor, b_levels: torch.Tensor, a: Grid, b: Grid, out: Grid
) -> torch.Tensor:
    """Output u8 levels of ONNX Runtime's ``QLinearAdd`` for stored levels of equal shape.

    Args:
        a_levels: ``A``, the first input's stored u8 values (any float or integer dtype).
        b_levels: ``B``, the second input's, the same shape (broadcast runs another loop).
        a: the first input's container grid ``(scale, zero point)``.
        b: the second input's.
        out: the output's.

    Returns:
        ``C`` as float32 integers in ``[0, 255]``.
    """
    (sa, za), (sb, zb), (sc, zc) = a, b, out
    r_a = _f32(sa) / _f32(sc)
    r_b = _f32(sb) / _f32(sc)
    fixed = _f32(zc) - _fma(r_a, _f32(za), r_b * _f32(zb))
    t = _fma(b_levels.float(), r_b, fixed)
    t = _fma(a_levels.float(), r_a, t)
    return torch.round(t).clamp_(0, 255)


def quantized_add_levels(
    a_levels: torch.Tensor, b_levels: torch.Tensor, a: Grid, b: Grid, out: Grid
) -> torch.Tensor:
    """Output u8 levels of PyTorch's ``quantized::add`` for stored levels of equal shape.

    The arguments and result are those of :func:`qlinear_add_levels`. ``add_relu``'s ReLU
    is left to the caller: clamping these levels at ``z_c`` gives the same result.
    """
    (sa, za), (sb, zb), (sc, zc) = a, b, out
    sa32, sb32 = _f32(sa), _f32(sb)
    da = _fma(a_levels.float(), sa32, sa32 * _f32(-za))
    db = _fma(b_levels.float(), sb32, sb32 * _f32(-zb))
    inv = _f32(1.0) / _f32(sc)
    return (torch.round((da + db) * inv) + zc).clamp_(0, 255)
