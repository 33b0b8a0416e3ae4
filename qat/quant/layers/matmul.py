"""``QMatMul``: ``a @ b`` of two activations (attention scores, attention × values) on grids.

Both inputs are quantized activations and the output gets its own quantizer, so the product
runs on an integer matmul kernel (ONNX Runtime fuses ``DQ → MatMul → Q`` into
``QLinearMatMul``). Under :func:`qat.runtime_numerics`, once :func:`qat.snap_bias` pinned both
input grids, it computes what that kernel computes: the exact integer sum of
``(qa − za)(qb − zb)``, requantized with the float32 multiplier ``sa · sb / sy``.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.layers.base import output_quantizer
from qat.quant.numerics import RuntimeNumerics
from qat.quant.spec import QuantSpec


class QMatMul(nn.Module, RuntimeNumerics):
    """``torch.matmul(a, b)`` with its own output quantizer."""

    #: The two input scales, pinned by :func:`qat.snap_bias` (None: not pinned).
    runtime_input_scales: tuple[float, float] | None = None

    def __init__(self, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.output_quant = output_quantizer(activation_spec)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        codes = self._pinned_codes(a, b)
        if codes is None:
            return self.output_quant(torch.matmul(a, b))
        sa, sb = (torch.tensor(s, dtype=torch.float32) for s in self.runtime_input_scales)
        acc = torch.matmul(*codes)  # float64: exact for these integer codes
        s_out, _ = self.output_quant.qparams()
        multiplier = (sa * sb) / s_out.float().reshape(())  # float32, as the runtime forms it
        levels = torch.round(acc.float() * multiplier)
        return self.output_quant(levels * s_out.float().reshape(()))

    def _pinned_codes(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        scales = self.runtime_input_scales
        oq = self.output_quant
        if not self.exact_numerics or self.training or scales is None:
            return None
        if not (oq.enabled and oq.fake_quant_enabled and oq.is_initialized):
            return None
        codes = []
        for x, s in zip((a, b), scales, strict=True):
            if x.dtype != torch.float32:
                return None
            s32 = torch.tensor(s, dtype=torch.float32)
            c = torch.round(x.double() / s32.double())
            if not torch.equal(c.float() * s32, x):
                return None  # off the pinned grid: ranges moved since
            codes.append(c)
        return codes[0], codes[1]
