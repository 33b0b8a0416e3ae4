"""``QConv2d``: a Conv2d (grouped / depthwise too) with fake-quantized weight and output."""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.layers.base import conv_kwargs, copy_weight_bias, output_quantizer, weight_quantizer
from qat.quant.numerics import RuntimeNumerics, quantized_output
from qat.quant.spec import QuantSpec


class QConv2d(nn.Conv2d, RuntimeNumerics):
    """``Conv2d`` (grouped / depthwise too) → optional ReLU → output quantizer.

    Weights are quantized per output channel (axis 0) when the spec is per-channel.
    """

    def __init__(
        self,
        *args,
        relu: bool = False,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.weight_quant = weight_quantizer(weight_spec, self.out_channels, axis=0)
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_output(
            self, self._conv_forward, x, self.weight_quant(self.effective_weight()), self.bias
        )

    def effective_weight(self) -> torch.Tensor:
        """The float weight the weight quantizer rounds (the exporters store its levels)."""
        return self.weight

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        relu: bool = False,
    ) -> QConv2d:
        q = cls(
            **conv_kwargs(conv),
            relu=relu,
            weight_spec=weight_spec,
            activation_spec=activation_spec,
        )
        q = copy_weight_bias(q, conv)
        return q

    def to_float(self) -> nn.Module:
        conv = copy_weight_bias(nn.Conv2d(**conv_kwargs(self)), self)
        return nn.Sequential(conv, nn.ReLU()) if self.relu else conv

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")
