"""The integer description of a trained model: what every exporter reads.

:func:`qat.export.convert.convert` fills these from the trained quantizers' own numbers; the
exporters (ONNX, TorchScript) only translate them, so nothing is re-derived per target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat.quant.grids import ActGrid

__all__ = [
    "COMBINE_KINDS",
    "ActGrid",
    "ConvertedModel",
    "LayerDesc",
    "WeightDesc",
    "keep_parameter_reads",
]

#: Integer ops over activations only (no weights): residual add, concat, matmul.
COMBINE_KINDS = ("add", "cat", "matmul")


@dataclass
class WeightDesc:
    """Integer weights of one layer.

    Attributes:
        int_weight: int8 tensor holding the levels (a 4-bit grid lives in ``[-8, 7]``).
        scale: float32 scales, ``(C,)`` per channel or ``(1,)`` per tensor.
        axis: channel axis of ``int_weight`` the scales run along.
        per_channel: one scale per output channel.
        bits: bit width of the weight grid.
        qmin, qmax: the weight grid.
        float_weight: ``int_weight · scale``: bitwise the fake-quantized weight.
    """

    int_weight: torch.Tensor
    scale: torch.Tensor
    axis: int
    per_channel: bool
    bits: int
    qmin: int
    qmax: int
    float_weight: torch.Tensor


@dataclass
class LayerDesc:
    """One quantized layer as the integer runtimes run it.

    ``kind`` is ``conv`` / ``linear`` (integer when :attr:`integer`), ``add`` / ``cat``
    (integer), or ``act`` / ``float`` (float islands: dequantize → float op → quantize).

    Attributes:
        name: qualified module name in the model.
        kind: see above.
        inputs: grid of each tensor input (None: a float input, allowed for float islands).
        output: output grid, or None when the output quantizer is disabled (float output).
        relu: the layer applies ReLU before its output quantization.
        integer: conv / linear run on the integer kernels (quantized weight and input).
        weight: integer weights (conv / linear with an enabled weight quantizer).
        float_weight: the weight the fake-quant forward uses (folded, fake-quantized if
            quantized): what a float island computes with.
        float_bias: the float bias of the fake-quant forward (folded for conv+BN).
        bias_int: int32 bias at scale ``bias_scale`` (integer conv / linear with a bias).
        bias_scale: float32 ``s_in · s_w`` per output channel.
        conv: ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``,
            ``kernel_size`` of a conv.
        dim: concat dimension.
        input_shapes: shapes seen in the example run.
        module: the fake-quant module (for float islands).
    """

    name: str
    kind: str
    inputs: tuple[ActGrid | None, ...]
    output: ActGrid | None
    relu: bool = False
    integer: bool = False
    weight: WeightDesc | None = None
    float_weight: torch.Tensor | None = None
    float_bias: torch.Tensor | None = None
    bias_int: torch.Tensor | None = None
    bias_scale: torch.Tensor | None = None
    conv: dict[str, Any] | None = None
    dim: int = 1
    input_shapes: tuple[tuple[int, ...], ...] = ()
    module: nn.Module | None = field(default=None, repr=False)

    @property
    def on_integer_kernel(self) -> bool:
        """An integer conv / linear, or an integer op over activations (add, cat, matmul)."""
        return self.integer or self.kind in COMBINE_KINDS

    @property
    def dequantized_bias(self) -> torch.Tensor | None:
        """``bias_int · bias_scale`` in float32 (the bias the integer kernels add)."""
        if self.bias_int is None or self.bias_scale is None:
            return self.float_bias
        return (self.bias_int.double() * self.bias_scale.double()).float()


@dataclass
class ConvertedModel:
    """The integer description of a whole model.

    Attributes:
        layers: name → description, in the order of the example run.
        input: grid of the model input (None: no input quantizer).
        output: grid of the model output (None: the output is float, e.g. 32-bit logits).
        example_output: the fake-quant model's output on the example input.
    """

    layers: dict[str, LayerDesc]
    input: ActGrid | None
    output: ActGrid | None
    example_output: Any = None

    def integer_layers(self) -> list[LayerDesc]:
        return [d for d in self.layers.values() if d.on_integer_kernel]

    def float_islands(self) -> list[LayerDesc]:
        return [d for d in self.layers.values() if not d.on_integer_kernel]


def keep_parameter_reads(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (an exporter's replacement of layer ``old``), answering reads of ``old``'s own
    parameters (as plain tensors: they travel in no exported file).

    A captured forward may read a layer's parameter beside calling it (EdgeNeXt's positional
    encoding: ``self.token_projection.weight.device``); the read must still work on the
    integer layer or float island that replaces the layer.
    """
    for name, p in old.named_parameters(recurse=False):
        if not hasattr(new, name):
            object.__setattr__(new, name, p.detach())
    return new
