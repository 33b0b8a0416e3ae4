"""The input quantization a language-model layer's ONNX kernel reads, as ONNX ops in the
exporter's symbolic graph (``g.op``): the fake-quant model's dynamic rounding op for op
(:func:`dynamic_ops`), per-token int8 codes for ``MatMulInteger`` (:func:`token_int8_ops`), and
the rescale of Q8_0 blocks to their fp16 scale before ``MatMulNBits``' int8 kernel
(:func:`q8_0_rescale_ops`). Used by :mod:`qat.export.onnx.llm`."""

from __future__ import annotations

from typing import Any

import torch

from qat.export.onnx.emit import _const
from qat.quant.blocks import GGUF_BLOCK
from qat.quant.qparams import qrange
from qat.quant.spec import QuantSpec

__all__ = ["dynamic_ops", "q8_0_rescale_ops", "token_int8_ops"]


def token_int8_ops(g: Any, x: Any, spec: QuantSpec) -> tuple[Any, Any]:
    """Per-token symmetric int8 codes of ``x`` as ``uint8`` (``q + 128``, for ``MatMulInteger``
    with the zero point 128: ONNX Runtime's fast u8 × s8 GEMM) and each row's scale, op for op
    :func:`qat.quant.dynamic.dynamic_quantize` (``amax / qmax``, 1 where that is 0,
    ``round(x / scale)`` half to even)."""
    f32 = lambda v: _const(g, torch.tensor(v, dtype=torch.float32))  # noqa: E731
    _, qmax = qrange(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)
    amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
    scale = g.op("Div", amax, f32(float(qmax)))
    scale = g.op("Where", g.op("Equal", scale, f32(0.0)), f32(1.0), scale)
    codes = g.op("Round", g.op("Div", x, scale))  # |codes| <= qmax: no clip needed
    return g.op("Cast", g.op("Add", codes, f32(128.0)), to_i=2), scale  # 2: uint8


def dynamic_ops(g: Any, x: Any, spec: QuantSpec, k: int) -> Any:
    """:func:`qat.quant.dynamic.dynamic_quantize` as ONNX float ops (the same op order)."""
    f32 = lambda v: _const(g, torch.tensor(v, dtype=torch.float32))  # noqa: E731
    block = 32 if spec.grid == "q8_0" else (spec.group_size or k)
    if spec.dynamic == "tensor":
        v = g.op("Reshape", x, _const(g, torch.tensor([1, -1], dtype=torch.int64)))
    else:
        v = g.op("Reshape", x, _const(g, torch.tensor([-1, block], dtype=torch.int64)))
    if spec.grid == "q8_0":
        amax = g.op("ReduceMax", g.op("Abs", v), axes_i=[1], keepdims_i=1)
        d = g.op("Div", amax, f32(127.0))
        zero = g.op("Equal", d, f32(0.0))
        inv = g.op("Where", zero, f32(0.0), g.op("Div", f32(1.0), d))
        scaled = g.op("Mul", v, inv)
        a = g.op("Abs", scaled)
        floored = g.op("Floor", a)
        frac2 = g.op("Floor", g.op("Mul", f32(2.0), g.op("Sub", a, floored)))
        codes = g.op("Mul", g.op("Sign", scaled), g.op("Add", floored, frac2))
        codes = g.op("Clip", codes, f32(-127.0), f32(127.0))
        d16 = g.op("Cast", g.op("Cast", d, to_i=10), to_i=1)  # fp16, as the file stores d
        out = g.op("Mul", codes, d16)
    else:
        qmin, qmax = qrange(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)
        lo = g.op("Min", g.op("ReduceMin", v, axes_i=[1], keepdims_i=1), f32(0.0))
        hi = g.op("Max", g.op("ReduceMax", v, axes_i=[1], keepdims_i=1), f32(0.0))
        if spec.symmetric:
            amax = g.op("Max", g.op("Neg", lo), hi) if qmin < 0 else hi
            scale = g.op("Div", amax, f32(float(qmax)))
            scale = g.op("Where", g.op("Equal", scale, f32(0.0)), f32(1.0), scale)
            zp = f32(0.0)
        else:
            scale = g.op("Div", g.op("Sub", hi, lo), f32(float(qmax - qmin)))
            scale = g.op("Where", g.op("Equal", hi, lo), f32(1.0), scale)
            zp = g.op("Sub", f32(float(qmin)), g.op("Div", lo, scale))
            zp = g.op("Round", g.op("Clip", zp, f32(float(qmin)), f32(float(qmax))))
        q = g.op("Add", g.op("Round", g.op("Div", v, scale)), zp)
        q = g.op("Clip", q, f32(float(qmin)), f32(float(qmax)))
        out = g.op("Mul", g.op("Sub", q, zp), scale)
    return g.op("Reshape", out, g.op("Shape", x))


def q8_0_rescale_ops(g: Any, x: Any) -> Any:
    """``x`` with each block of 32 scaled by ``d16 / d`` (``d = amax / 127``, ``d16`` its fp16
    rounding: Q8_0's stored scale), so that ``MatMulNBits``' int8 kernel, which quantizes its
    input per block with the float32 scale ``amax / 127``, takes the Q8_0 scale ``d16`` and the
    codes ``round(x / d)`` of the fake-quant model (up to float32 rounding of the ratio and
    round-half-to-even ties). Three passes over ``x`` where the explicit rounding
    (:func:`dynamic_ops`) takes a dozen."""
    f32 = lambda v: _const(g, torch.tensor(v, dtype=torch.float32))  # noqa: E731
    v = g.op("Reshape", x, _const(g, torch.tensor([-1, GGUF_BLOCK], dtype=torch.int64)))
    d = g.op("Div", g.op("ReduceMax", g.op("Abs", v), axes_i=[1], keepdims_i=1), f32(127.0))
    d16 = g.op("Cast", g.op("Cast", d, to_i=10), to_i=1)
    # An all-zero block (d = 0) gets ratio 0, not 0/0: d16 is 0 for every d below fp16's
    # smallest subnormal, so the floor changes nothing else (and saves an Equal / Where).
    ratio = g.op("Div", d16, g.op("Max", d, f32(1e-30)))
    return g.op("Reshape", g.op("Mul", v, ratio), g.op("Shape", x))
