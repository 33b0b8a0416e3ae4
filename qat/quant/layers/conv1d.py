"""``QConv1D``: Hugging Face's ``Conv1D`` (GPT-2's linear layer, weight ``(in, out)``) quantized.

Found by duck typing (:func:`is_hf_conv1d`), so the core never imports ``transformers``. The
parameters keep their names and layout (``weight (in, out)``, ``bias (out,)``), so a prepared
GPT-2 still loads Hugging Face state dicts; weights are quantized per output column (axis 1),
or per group along the input rows.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.layers.base import input_quantizer, like, output_quantizer, weight_quantizer
from qat.quant.spec import QuantSpec


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (and look-alikes): ``y = x @ W + b``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


class QConv1D(nn.Module):
    """``x @ W + b`` with ``W (in, out)``: weight, dynamic input and output quantizers."""

    def __init__(
        self,
        nx: int,
        nf: int,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        self.weight_quant = weight_quantizer(weight_spec, nf, axis=1, shape=(nx, nf))
        self.act_quant = input_quantizer(activation_spec)
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        shape = (*x.shape[:-1], self.nf)
        y = torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight_quant(self.weight))
        return self.output_quant(y.reshape(shape))

    @classmethod
    def from_float(
        cls,
        conv: nn.Module,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> QConv1D:
        nx, nf = conv.weight.shape
        q = like(cls(nx, nf, weight_spec, activation_spec), conv)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            q.bias.copy_(conv.bias)
        return q

    def extra_repr(self) -> str:
        return f"nx={self.nx}, nf={self.nf}"
