"""Dynamically quantized linear layers as ONNX Runtime's integer kernels compute them.

A language model's linear layers with dynamic activations export to two ONNX Runtime kernels
(:mod:`qat.export.onnx.llm`), whose integer sums are exact but whose float epilogues round in
their own order. Evaluated under :func:`qat.runtime_numerics` (``target="onnx"``), a
:class:`~qat.QLinear` computes what the kernel computes, bit for bit:

- per-tensor uint8 activations × 8-bit per-channel weights (``DynamicQuantizeLinear →
  MatMulInteger``, fused into ``DynamicQuantizeMatMul``): ``fl(fl(acc) · fl(s_x · s_w))``,
  then the bias in float32;
- per-token symmetric int8 activations × 8-bit per-channel weights (the row's codes plus 128
  into ``MatMulInteger`` with zero point 128, then two ``Mul``): ``fl(fl(fl(acc) · s_x) · s_w)``,
  then the bias;
- Q8_0 activations (blocks of 32) × 4- or 8-bit weights in groups of 32 (``MatMulNBits`` at
  ``accuracy_level=4``, int8 compute, bias input): ORT re-quantizes the Q8_0 values to the
  same codes and scales, sums each block exactly with the weights stored unsigned
  (``u = w + 2^(b−1)``), and combines the blocks in float32: each group of four blocks (128
  inputs) feeds 16 lanes of 8 products, ``lane = fma(partial, fl(s_a·s_b), lane)`` group
  after group; lanes ``i`` and ``i+8`` are added, the eight left are summed as
  ``((x0+x1)+x2)+x3 + ((x4+x5)+x6)+x7``, the bias is added, and last the zero-point term
  ``Σ_blocks fl(s_a·Σc) · (−2^(b−1)·s_b)`` (an fma chain from 0) is added.

These are ONNX Runtime 1.32's x86 AVX-512 VNNI kernels (checked against it on 7 million
outputs, 0 differences); other CPUs may sum in another order, where parity falls back to the
agreement thresholds. Layers the kernels do not take this way (``K`` not a multiple of 128,
``N`` not a multiple of 4, other grids) evaluate with exact float64 sums
(:mod:`qat.quant.numerics`).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.blocks import GGUF_BLOCK, fp16_scale, gguf_codes, gguf_scale
from qat.quant.dynamic import dynamic_qparams
from qat.quant.qparams import qrange
from qat.quant.spec import QuantSpec
from qat.quant.weight_codes import weight_codes

__all__ = ["ort_linear_kind", "runtime_dynamic_linear"]

#: Inputs per lane group of MatMulNBits' int8 kernel (4 blocks of 32), and its float32 lanes.
_GROUP, _LANES = 128, 16


def int8_activations(spec: QuantSpec | None) -> str | None:
    """The ONNX Runtime integer GEMM that takes dynamic 8-bit activations on ``spec``'s grid:
    ``"dynamic_int8"`` (per-tensor uint8, ``DynamicQuantizeLinear``'s grid), ``"token_int8"``
    (per-token symmetric int8: torchao's and vLLM's W8A8), or None."""
    if spec is None or spec.bits != 8 or spec.grid != "affine" or spec.reduce_range:
        return None
    if spec.dynamic == "tensor" and not spec.signed and not spec.symmetric:
        return "dynamic_int8"
    if spec.dynamic == "token" and spec.signed and spec.symmetric and not spec.group_size:
        return "token_int8"
    return None


def int8_blocks(spec: QuantSpec | None, group: int) -> bool:
    """Whether ``spec`` is the grid ``MatMulNBits``' int8 compute (``accuracy_level=4``) puts
    its input on by itself: symmetric int8 per block of the weight's ``group`` inputs, scale
    ``max|x| / 127`` in float32 (``lm_w4a8``). Exported, such a layer needs no op before the
    kernel; Q8_0 (fp16 scales) needs a rescale."""
    return (
        spec is not None
        and spec.bits == 8
        and spec.grid == "affine"
        and spec.dynamic == "token"
        and spec.signed
        and spec.symmetric
        and not spec.reduce_range
        and spec.group_size == group
    )


def ort_linear_kind(layer: nn.Module) -> str | None:
    """``"dynamic_int8"``, ``"token_int8"``, ``"nbits_int8"`` (the kernels above) or None."""
    aq, wq = getattr(layer, "act_quant", None), layer.weight_quant
    if aq is None or not (aq.enabled and bool(aq.fake_quant_enabled)) or not wq.enabled:
        return None
    a, w = aq.spec, wq.spec
    n, k = layer.weight.shape
    int8 = int8_activations(a)
    if int8 and w.bits == 8 and w.grid == "affine" and not w.group_size:
        return int8
    q8_blocks = a.grid == "q8_0" and w.group_size == GGUF_BLOCK
    if q8_blocks and wq.bits in (4, 8) and k % _GROUP == 0 and n % 4 == 0:
        return "nbits_int8"
    return None


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fma(a, b, c)`` of float32 tensors, rounded once to float32.

    ``a·b`` is exact in float64 and ``a·b + c`` rounds there first; rounding that to float32
    again differs from one rounding only where the float64 sum sits exactly halfway between
    two float32 values (its 29 extra mantissa bits ``100…0``) without the exact sum being
    there: those few elements take the neighbour on the exact sum's side (TwoSum's error).
    """
    p = a.double() * b.double()
    s = p + c.double()
    r = s.float()
    half = (s.view(torch.int64) & _EXTRA_BITS) == _HALF
    if bool(half.any()):
        i = half.nonzero(as_tuple=True)
        pi, si = p[i], s[i]
        bb = si - pi
        err = (pi - (si - bb)) + (c.double()[i] - bb)
        toward_zero = (si.view(torch.int64) & ~_EXTRA_BITS).view(torch.float64).float()
        away = torch.nextafter(toward_zero, torch.where(si > 0, torch.inf, -torch.inf).float())
        exact = torch.where((err > 0) == (si > 0), away, toward_zero)
        r[i] = torch.where(err != 0, exact, r[i])
    return r


#: float64 mantissa bits below float32's (52 − 23), and the pattern of a float32 midpoint.
_EXTRA_BITS = (1 << 29) - 1
_HALF = 1 << 28


def _lane_index() -> torch.Tensor:
    """``(16, 8)``: the inputs of each float32 lane within a group of 128 inputs."""
    idx = torch.empty(_LANES, 8, dtype=torch.long)
    for lane in range(4):
        for part in range(4):
            base = (0 if part < 2 else 64) + 16 * lane + 4 * (part % 2)
            idx[4 * lane + part] = torch.tensor([base + i for i in (0, 1, 2, 3, 8, 9, 10, 11)])
    return idx


_LANE = _lane_index()


def _nbits_int8(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Every product and lane partial is an integer below 2^24, exact in float32; every add and
    # multiply below is one float32 operation, as in the kernel; only the fmas are emulated.
    m, k = x.shape
    w_codes, w_scales, _, _ = weight_codes(layer)
    n, nb, groups = w_codes.shape[0], k // GGUF_BLOCK, k // _GROUP
    blocks = x.reshape(-1, GGUF_BLOCK).float()
    d = gguf_scale(blocks, "q8_0")
    a_codes = gguf_codes(blocks, d, "q8_0").reshape(m, k)
    sa, sb = fp16_scale(d).reshape(m, nb), w_scales.float()
    zp = 1 << (layer.weight_quant.bits - 1)

    def lanes(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(v.shape[0], groups, _GROUP)[:, :, _LANE.reshape(-1)]
        return v.reshape(v.shape[0], groups, _LANES, 8)

    lane_block = _LANE[:, 0] // GGUF_BLOCK
    ua, uw = lanes(a_codes), lanes(w_codes.float() + zp)
    a_sums = sa * a_codes.reshape(m, nb, GGUF_BLOCK).sum(-1)  # fl(s_a · Σc) per block
    zp_term = -zp * sb
    bias = None if layer.bias is None else layer.bias.detach().float()
    out = torch.empty(m, n, dtype=torch.float32)
    for r0 in range(0, m, 256):  # the lane partials are (rows, N, K/8)
        r1 = min(m, r0 + 256)
        partial = torch.einsum("mgle,ngle->mngl", ua[r0:r1], uw)
        scale = (sa[r0:r1, None, :] * sb[None]).reshape(r1 - r0, n, groups, 4)[..., lane_block]
        acc = partial[:, :, 0] * scale[:, :, 0] + 0.0  # an fma onto +0: one product (-0 → +0)
        for g in range(1, groups):
            acc = _fma32(partial[:, :, g], scale[:, :, g], acc)
        a8 = acc[..., :8] + acc[..., 8:]
        y = (((a8[..., 0] + a8[..., 1]) + a8[..., 2]) + a8[..., 3]) + (
            ((a8[..., 4] + a8[..., 5]) + a8[..., 6]) + a8[..., 7]
        )
        if bias is not None:
            y = y + bias[None]
        corr = a_sums[r0:r1, 0][:, None] * zp_term[None, :, 0] + 0.0
        for b in range(1, nb):
            corr = _fma32(a_sums[r0:r1, b][:, None].expand_as(y), zp_term[None, :, b], corr)
        out[r0:r1] = y + corr
    return out


def _dynamic_int8(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    spec = layer.act_quant.spec
    qmin, qmax = qrange(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)
    token = spec.dynamic == "token"
    s_x, z_x = dynamic_qparams(x.float(), qmin, qmax, spec.symmetric, dim=-1 if token else None)
    q = torch.clamp(torch.round(x.float() / s_x) + z_x, qmin, qmax) - z_x
    w_codes, s_w, _, _ = weight_codes(layer)
    acc = q.double() @ w_codes.t().double()  # exact: integers below 2^53
    if token:  # two Muls (qat.export.onnx.llm)
        y = (acc.float() * s_x) * s_w.reshape(-1)[None]
    else:  # DynamicQuantizeMatMul
        y = acc.float() * (s_x.reshape(()) * s_w.reshape(-1))[None]
    if layer.bias is not None:
        y = y + layer.bias.detach().float()[None]
    return y


@torch.no_grad()
def runtime_dynamic_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` as ONNX Runtime's kernel computes it (module docstring), from the layer's
    *unquantized* input ``x``; None where :func:`ort_linear_kind` has no kernel for it."""
    kind = ort_linear_kind(layer)
    if kind is None:
        return None
    flat = x.detach().reshape(-1, x.shape[-1])
    y = _nbits_int8(layer, flat) if kind == "nbits_int8" else _dynamic_int8(layer, flat)
    return y.reshape(*x.shape[:-1], y.shape[-1])
