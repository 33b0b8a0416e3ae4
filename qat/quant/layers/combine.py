"""``QAdd`` and ``QCat``: ops over several tensors, each with its own output quantizer.

Requantize after add: the residual add (or concat) gets the output grid the integer runtimes
requantize its result to, so the graph trained is the graph they execute.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.ops import Add, Cat
from qat.quant.layers.base import output_quantizer
from qat.quant.spec import QuantSpec


class QAdd(nn.Module):
    """``a + b`` (→ ReLU) with its own output quantizer: requantize after add."""

    def __init__(self, relu: bool = False, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.relu = relu
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return self.output_quant(y, relu=self.relu)

    @classmethod
    def from_float(cls, add: Add, activation_spec: QuantSpec | None = None) -> QAdd:
        return cls(relu=add.relu, activation_spec=activation_spec)

    def to_float(self) -> Add:
        return Add(relu=self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class QCat(nn.Module):
    """``torch.cat`` with its own output quantizer (inputs on different grids are requantized)."""

    def __init__(self, dim: int = 1, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.output_quant(torch.cat(list(tensors), dim=self.dim))

    @classmethod
    def from_float(cls, cat: Cat, activation_spec: QuantSpec | None = None) -> QCat:
        return cls(dim=cat.dim, activation_spec=activation_spec)

    def to_float(self) -> Cat:
        return Cat(dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
