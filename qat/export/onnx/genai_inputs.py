"""The input quantization ops the genai graph's kernels read (ONNX nodes appended to the
builder's graph): the rescale of Q8_0 blocks to their fp16 scale before ``MatMulNBits``' int8
kernel, or their whole rounding (:func:`q8_0_input`), and per-token int8 codes for
``MatMulInteger`` (:func:`token_int8_input`), as :mod:`qat.export.onnx.llm_inputs` writes them
for the whole-sequence file. Used by :mod:`qat.export.onnx.genai`."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["NodeWriter", "q8_0_input", "token_int8_input"]


class NodeWriter:
    """Appends ONNX nodes (named under ``prefix``) to ``nodes`` and constants to ``graph``."""

    def __init__(self, prefix: str, graph: Any, nodes: list[onnx.NodeProto]) -> None:
        self.prefix, self.graph, self.nodes = prefix, graph, nodes
        self.count = iter(range(1000))

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        out = f"{self.prefix}/{kind}_{next(self.count)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        name = f"{self.prefix}/c{next(self.count)}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def q8_0_input(x: str, prefix: str, graph: Any, explicit: bool) -> tuple[str, list[onnx.NodeProto]]:
    """The input ``MatMulNBits`` at accuracy level 4 reads after Q8_0 activations (blocks of 32
    along the last axis, ``d = amax / 127``, ``d16`` its fp16 rounding, Q8_0's stored scale).
    ``explicit``: llama.cpp's whole Q8_0 rounding as float ops (codes rounded half away from
    zero, times ``d16``), the ops :mod:`qat.export.onnx.llm` writes for
    :func:`qat.quant.dynamic.dynamic_quantize`; the kernel re-quantizes those values to the
    same codes. Otherwise each block times ``d16 / d``: the kernel, which quantizes with the
    float32 scale ``amax / 127``, then takes ``d16`` and the codes ``round(x / d)`` up to float32
    rounding of the ratio, in three passes over ``x`` where the rounding takes a dozen.
    Returns the new tensor's name and the nodes."""
    nodes: list[onnx.NodeProto] = []
    w = NodeWriter(prefix, graph, nodes)
    v = w.op("Reshape", x, w.const([-1, 32], np.int64))
    amax = w.op("ReduceMax", w.op("Abs", v), w.const([1], np.int64), keepdims=1)
    d = w.op("Div", amax, w.const(127.0))
    d16 = w.op("Cast", w.op("Cast", d, to=onnx.TensorProto.FLOAT16), to=onnx.TensorProto.FLOAT)
    if explicit:
        zero = w.op("Equal", d, w.const(0.0))
        inv = w.op("Where", zero, w.const(0.0), w.op("Div", w.const(1.0), d))
        scaled = w.op("Mul", v, inv)
        a = w.op("Abs", scaled)
        floored = w.op("Floor", a)
        frac2 = w.op("Floor", w.op("Mul", w.const(2.0), w.op("Sub", a, floored)))
        codes = w.op("Mul", w.op("Sign", scaled), w.op("Add", floored, frac2))
        rounded = w.op("Mul", w.op("Clip", codes, w.const(-127.0), w.const(127.0)), d16)
    else:
        # An all-zero block (d = 0) gets ratio 0, not 0/0 (d16 is 0 wherever d is that small).
        rounded = w.op("Mul", v, w.op("Div", d16, w.op("Max", d, w.const(1e-30))))
    return w.op("Reshape", rounded, w.op("Shape", x)), nodes


def token_int8_input(
    x: str, prefix: str, graph: Any
) -> tuple[tuple[str, str, str], list[onnx.NodeProto]]:
    """Per-token symmetric int8 codes of ``x`` plus 128 as uint8, each row's scale and the
    zero point 128, for ``MatMulInteger`` (the ops :mod:`qat.export.onnx.llm` writes, op for op
    :func:`qat.quant.dynamic.dynamic_quantize`)."""
    nodes: list[onnx.NodeProto] = []
    w = NodeWriter(prefix, graph, nodes)
    amax = w.op("ReduceMax", w.op("Abs", x), w.const([-1], np.int64), keepdims=1)
    scale = w.op("Div", amax, w.const(127.0))
    scale = w.op("Where", w.op("Equal", scale, w.const(0.0)), w.const(1.0), scale)
    codes = w.op("Round", w.op("Div", x, scale))
    u8 = w.op("Cast", w.op("Add", codes, w.const(128.0)), to=onnx.TensorProto.UINT8)
    return (u8, scale, w.const(128, np.uint8)), nodes
