"""``QAct`` (an activation or pooling op + output quantizer) and ``FloatLayer`` (a skipped layer)."""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.float_island import float64_call
from qat.quant.layers.base import output_quantizer
from qat.quant.numerics import RuntimeNumerics
from qat.quant.spec import QuantSpec


class QAct(nn.Module, RuntimeNumerics):
    """Any activation / pooling module followed by an output quantizer.

    Used for ops whose output leaves the integer grid of their input (average pooling,
    sigmoid, hardswish, GELU, ...). ReLU and max-pool keep the grid and are left alone.

    A float island (output not quantized: LayerNorm, attention, GELU between a language
    model's dynamically quantized layers) evaluates under :func:`qat.runtime_numerics` in
    float64, rounded to float32 (:mod:`qat.quant.float_island`), as the ONNX export computes it.
    """

    def __init__(self, act: nn.Module, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.act = act
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.exact_numerics and not self.training and not self.output_quant.enabled:
            return self.output_quant(float64_call(self.act, args, kwargs))
        return self.output_quant(self.act(*args, **kwargs))

    @classmethod
    def from_float(cls, act: nn.Module, activation_spec: QuantSpec | None = None) -> QAct:
        return cls(act, activation_spec=activation_spec)

    def to_float(self) -> nn.Module:
        return self.act


class FloatLayer(nn.Module):
    """A layer left in float (an override with ``skip: true``) between quantized neighbours.

    It computes in float but re-quantizes its output, so the next quantized layer still reads
    a tensor on an integer grid; the exporters dequantize before it and quantize after it. Give
    the override ``activation: {bits: 32}`` to keep its output in float too (e.g. the logits).
    """

    def __init__(self, module: nn.Module, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.module = module
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.output_quant(self.module(*args, **kwargs))

    def to_float(self) -> nn.Module:
        return self.module
