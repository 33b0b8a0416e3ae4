"""The integer weights of a language model's quantized layers, read from the trained quantizers.

For every linear-like layer (``QLinear``, Hugging Face ``Conv1D`` as ``QConv1D``) and every
``QEmbedding``: integer codes ``(rows, in)``, one dequantization scale per group of each row,
and the group size, such that ``codes · scale`` is bit for bit the weight the fake-quant model
computes with (checked here, so every LM exporter writes exactly the trained model). For GGUF
grids the scale is the fp16-rounded ``d`` (what the file stores); for affine grids the float32
scale. Nothing is re-derived from the float weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qat.quant.kquants import KQUANT_GRIDS
from qat.quant.layers import QConv1D, QEmbedding, QLinear
from qat.quant.quantizer import FakeQuantizer
from qat.quant.weight_codes import weight_codes

__all__ = ["QuantWeight", "quant_weight", "weighted_layers"]


@dataclass
class QuantWeight:
    """One layer's weight as integers.

    Attributes:
        codes: ``(rows, in)`` int32 codes in ``[qmin, qmax]`` (rows: output features, or
            embedding entries).
        scales: ``(rows, in // group)`` float32 dequantization scales.
        group: elements per scale along ``in`` (``in`` for per-channel weights).
        bits: the grid's bit width; ``grid``: ``affine``, ``q8_0`` or ``q4_0``.
        d32: GGUF grids: the float32 ``d`` the codes were computed with (else None).
        weight: ``codes · scales`` as ``(rows, in)`` float32: the fake-quant weight.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    group: int
    bits: int
    grid: str
    d32: torch.Tensor | None
    weight: torch.Tensor


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every linear-like and embedding layer with quantized weights."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, QLinear | QConv1D | QEmbedding) and m.weight_quant.enabled
    ]


@torch.no_grad()
def quant_weight(layer: nn.Module, name: str = "") -> QuantWeight:
    """The integer weight of a quantized linear / Conv1D / embedding layer (module docstring).

    Raises:
        ValueError: the quantizer is off or never saw data, or codes · scales does not
            reproduce the fake-quant weight (an unsupported quantizer configuration).
    """
    q: FakeQuantizer = layer.weight_quant
    where = name or type(layer).__name__
    if not (q.enabled and q.fake_quant_enabled and q.is_initialized):
        raise ValueError(
            f"layer {where!r}: its weight quantizer is off or never saw data: calibrate or "
            "train the model (qat.calibrate) before exporting"
        )
    spec = q.spec
    if spec.grid in KQUANT_GRIDS:  # (d·sc)·q − dmin·m is no codes × scales: GGUF packs it
        raise ValueError(
            f"layer {where!r}: its weights are on the k-quant grid {spec.grid}, which only GGUF "
            "stores: export it with export.targets=[gguf], or train with quant=lm_q4_0 for ONNX"
        )
    codes, scales, group, d32 = weight_codes(layer, where)
    deq = (codes.reshape(-1, group) * scales.reshape(-1, 1)).reshape(codes.shape)
    expected = q(layer.weight).detach().float()
    expected = expected.t() if isinstance(layer, QConv1D) else expected
    if not torch.equal(deq, expected):
        raise ValueError(
            f"layer {where!r}: integer codes x scales differ from the fake-quant weight "
            f"(max {float((deq - expected).abs().max()):.3g}); this quantizer setup cannot be "
            "exported"
        )
    return QuantWeight(
        codes=codes.to(torch.int32),
        scales=scales.contiguous(),
        group=group,
        bits=spec.bits if spec.grid == "affine" else (8 if spec.grid == "q8_0" else 4),
        grid=spec.grid,
        d32=None if d32 is None else d32.reshape(scales.shape),
        weight=deq,
    )
