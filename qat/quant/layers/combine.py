"""``QAdd`` and ``QCat``: ops over several tensors, each with its own output quantizer.

Requantize after add: the residual add (or concat) gets the output grid the integer runtimes
requantize its result to, so the graph trained is the graph they execute. Under
:func:`qat.runtime_numerics`, once :func:`qat.snap_bias` pinned both input grids, an add
computes what ONNX Runtime's ``QLinearAdd`` (target ``onnx``) or PyTorch's ``quantized::add``
(the TorchScript targets) computes (:mod:`qat.quant.runtime_add`).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.ops import Add, Cat
from qat.quant.layers.base import output_quantizer
from qat.quant.numerics import RuntimeNumerics, grid_values, static_output_grid, stored_levels
from qat.quant.runtime_add import Grid, qlinear_add_levels, quantized_add_levels
from qat.quant.spec import QuantSpec


class QAdd(nn.Module, RuntimeNumerics):
    """``a + b`` (→ ReLU) with its own output quantizer: requantize after add."""

    #: Both inputs' container grids ``(scale, zero point)``, pinned by :func:`qat.snap_bias`.
    runtime_input_grids: tuple[Grid, Grid] | None = None

    def __init__(self, relu: bool = False, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.relu = relu
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self._runtime_sum(a, b)
        return self.output_quant(a + b if y is None else y, relu=self.relu)

    def _runtime_sum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """The runtime kernel's output as a value on the output grid, or None where it does
        not apply (not runtime numerics, nothing pinned, broadcasting, an input off its grid)."""
        grids = self.runtime_input_grids
        if not self.exact_numerics or self.training or grids is None or a.shape != b.shape:
            return None
        out = static_output_grid(self.output_quant)
        if out is None:
            return None
        levels = [stored_levels(x, s, z) for x, (s, z) in zip((a, b), grids, strict=True)]
        if levels[0] is None or levels[1] is None:
            return None  # off the pinned grid: ranges moved since
        kernel = qlinear_add_levels if self.numerics_target == "onnx" else quantized_add_levels
        return grid_values(kernel(levels[0], levels[1], grids[0], grids[1], out), out)

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
