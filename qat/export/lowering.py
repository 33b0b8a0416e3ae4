"""One lowering policy for every target: which layers run on integer kernels, which in float.

Each exporter asks :func:`lower` how to emit a layer and implements the answer; none decides
on its own. What differs between targets is stated once, as data (:data:`TARGETS`): the
capabilities of each runtime's integer kernels.

- ``conv`` / ``linear``: an integer conv / matmul kernel on the input's grid (int8 weights,
  int32 bias), requantized to the output grid (or ending in float where the target can);
- ``add`` / ``cat``: integer residual add / concat on the inputs' grids;
- ``matmul``: an integer matmul of two activations (attention), where the target has one;
- ``float``: a float island, dequantize → the layer's float op → quantize, computing exactly
  what the fake-quant model computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from qat.export.convert import convert, explicit_padding
from qat.export.ir import ConvertedModel, LayerDesc

__all__ = ["FLOAT", "TARGETS", "TargetCaps", "layer_macs", "lower", "placement", "placement_report"]

FLOAT = "float"


@dataclass(frozen=True)
class TargetCaps:
    """What a target runtime's integer conv / matmul kernels accept.

    Attributes:
        float_output: an integer layer may end in float, without output requantization (ONNX:
            ``DQ → Gemm`` with no ``Q``; PyTorch's quantized kernels always requantize).
        asymmetric_padding: integer convs take different top / bottom padding (ONNX ``pads``;
            ``quantized::conv2d`` pads symmetrically).
        integer_matmul: an integer matmul of two activations (ONNX Runtime fuses
            ``QLinearMatMul``; PyTorch's ``quantized::matmul`` dequantizes and runs in float).
        integer_add: an integer residual add kernel whose arithmetic the fake-quant model
            reproduces under :func:`qat.runtime_numerics` (PyTorch's ``quantized::add``, ONNX
            Runtime's ``QLinearAdd``: :mod:`qat.quant.runtime_add`).
    """

    float_output: bool
    asymmetric_padding: bool
    integer_matmul: bool
    integer_add: bool


#: The export targets and their integer kernels' capabilities.
TARGETS: dict[str, TargetCaps] = {
    "onnx": TargetCaps(
        float_output=True, asymmetric_padding=True, integer_matmul=True, integer_add=True
    ),
    "torchscript": TargetCaps(
        float_output=False, asymmetric_padding=False, integer_matmul=False, integer_add=True
    ),
}


def lower(desc: LayerDesc, target: str) -> str:
    """How ``target`` runs the layer: ``conv``, ``linear``, ``add``, ``cat``, ``matmul``, ``float``."""
    caps = TARGETS[target]
    if desc.kind == "add":
        return "add" if caps.integer_add else FLOAT
    if desc.kind == "cat":
        return desc.kind
    if desc.kind == "matmul":
        return "matmul" if caps.integer_matmul else FLOAT
    if desc.kind not in ("conv", "linear") or not desc.integer:
        return FLOAT
    if desc.output is None and not caps.float_output:
        return FLOAT
    if desc.kind == "conv":
        pad = explicit_padding(desc)
        if pad is None or (pad[:2] != pad[2:] and not caps.asymmetric_padding):
            return FLOAT  # reflect / replicate padding, or asymmetric where not supported
    return desc.kind


def placement(converted: ConvertedModel, target: str) -> dict[str, str]:
    """``{layer name: lowering}`` for every layer of ``converted``, in call order."""
    return {name: lower(desc, target) for name, desc in converted.layers.items()}


def layer_macs(desc: LayerDesc) -> int:
    """Multiply-accumulates of one call of the layer on the example input (0 for non-MAC ops)."""
    if not desc.input_shapes:
        return 0
    shape = desc.input_shapes[0]
    if desc.kind == "linear" and desc.float_weight is not None:
        n_out, n_in = desc.float_weight.shape
        return math.prod(shape[:-1]) * n_in * n_out
    if desc.kind == "conv" and desc.float_weight is not None and desc.conv is not None:
        c = desc.conv
        pad = explicit_padding(desc) or (*c["padding"], *c["padding"])
        out = [
            (shape[2 + i] + pad[i] + pad[2 + i] - c["dilation"][i] * (c["kernel_size"][i] - 1) - 1)
            // c["stride"][i]
            + 1
            for i in range(2)
        ]
        weight = desc.float_weight.shape  # (out, in / groups, kh, kw)
        return shape[0] * weight[0] * out[0] * out[1] * math.prod(weight[1:])
    if desc.kind == "matmul" and len(desc.input_shapes) == 2:
        a, b = desc.input_shapes
        return math.prod(a[:-1]) * a[-1] * b[-1]
    return 0


def placement_report(model: nn.Module, example_input: Any) -> dict[str, Any]:
    """Per layer: what it is, how each target runs it, its MACs; per target the share of MACs
    on integer kernels (the rest run in float islands). JSON-able.
    """
    converted = convert(model, example_input)
    layers = []
    totals = {t: [0, 0] for t in TARGETS}  # integer, all
    for name, desc in converted.layers.items():
        macs = layer_macs(desc)
        row = {"name": name, "kind": desc.kind, "macs": macs}
        for target in TARGETS:
            how = lower(desc, target)
            row[target] = how
            totals[target][1] += macs
            if how != FLOAT:
                totals[target][0] += macs
        layers.append(row)
    share = {t: (i / n if n else None) for t, (i, n) in totals.items()}
    return {"layers": layers, "total_macs": totals["onnx"][1], "integer_mac_share": share}
