"""One lowering policy for every target: which layers run on integer kernels, which in float.

Each exporter asks :func:`lower` how to emit a layer and implements the answer; none decides
on its own. What differs between targets is stated once, as data (:data:`TARGETS`): the
capabilities of each runtime's integer kernels.

- ``conv`` / ``linear``: an integer conv / matmul kernel on the input's grid (int8 weights,
  int32 bias), requantized to the output grid (or ending in float where the target can);
- ``add`` / ``cat``: integer residual add / concat on the inputs' grids;
- ``float``: a float island, dequantize → the layer's float op → quantize, computing exactly
  what the fake-quant model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from qat.export.convert import explicit_padding
from qat.export.ir import ConvertedModel, LayerDesc

__all__ = ["FLOAT", "TARGETS", "TargetCaps", "lower", "placement"]

FLOAT = "float"


@dataclass(frozen=True)
class TargetCaps:
    """What a target runtime's integer conv / matmul kernels accept.

    Attributes:
        float_output: an integer layer may end in float, without output requantization (ONNX:
            ``DQ → Gemm`` with no ``Q``; PyTorch's quantized kernels always requantize).
        asymmetric_padding: integer convs take different top / bottom padding (ONNX ``pads``;
            ``quantized::conv2d`` pads symmetrically).
    """

    float_output: bool
    asymmetric_padding: bool


#: The export targets and their integer kernels' capabilities.
TARGETS: dict[str, TargetCaps] = {
    "onnx": TargetCaps(float_output=True, asymmetric_padding=True),
    "torchscript": TargetCaps(float_output=False, asymmetric_padding=False),
}


def lower(desc: LayerDesc, target: str) -> str:
    """How ``target`` runs the layer: ``"conv"``, ``"linear"``, ``"add"``, ``"cat"`` or ``"float"``."""
    caps = TARGETS[target]
    if desc.kind in ("add", "cat"):
        return desc.kind
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
