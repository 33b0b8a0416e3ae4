"""``QLinear``: a Linear with fake-quantized weight (per output row, or per group of it) and
output; with a dynamic activation spec it quantizes its input instead (``act_quant``) and
leaves its output in float, as ONNX Runtime's dynamic int8 and llama.cpp's kernels do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.layers.base import (
    copy_weight_bias,
    input_quantizer,
    output_quantizer,
    weight_quantizer,
)
from qat.quant.numerics import RuntimeNumerics, quantized_output
from qat.quant.runtime_matmul import runtime_dynamic_linear
from qat.quant.spec import QuantSpec


class QLinear(nn.Linear, RuntimeNumerics):
    """``Linear`` → optional ReLU → output quantizer; weights per output row (axis 0)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        relu: bool = False,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.relu = relu
        shape = (out_features, in_features)
        self.weight_quant = weight_quantizer(weight_spec, out_features, axis=0, shape=shape)
        self.act_quant = input_quantizer(activation_spec)
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            if self.exact_numerics and not self.training and self.numerics_target == "onnx":
                # ONNX Runtime's dynamic int8 / MatMulNBits kernels, bit for bit.
                y = runtime_dynamic_linear(self, x)
                if y is not None:
                    return self.output_quant(y)
            x = self.act_quant(x)
        return quantized_output(self, F.linear, x, self.weight_quant(self.weight), self.bias)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        relu: bool = False,
    ) -> QLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            relu=relu,
            weight_spec=weight_spec,
            activation_spec=activation_spec,
        )
        q = copy_weight_bias(q, linear)
        return q

    def to_float(self) -> nn.Module:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = copy_weight_bias(lin, self)
        return nn.Sequential(lin, nn.ReLU()) if self.relu else lin

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")
