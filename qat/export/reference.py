"""Float computations of a layer from its description alone (float islands, reference numbers).

Exporters run these while tracing: they use no module parameters, only :mod:`qat.export.ir`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.export.ir import ConvertedModel, LayerDesc

__all__ = ["float_forward", "grid_summary", "reference_forward"]


def float_forward(desc: LayerDesc, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The float computation of a layer before its output quantizer (float islands).

    For conv / linear it uses :attr:`LayerDesc.float_weight` (the fake-quantized or float
    weight) and the float bias, exactly as the fake-quant forward does; ``relu`` is applied.
    """
    mod = desc.module
    assert mod is not None
    if desc.kind == "conv":
        y = nn.Conv2d._conv_forward(mod, args[0], desc.float_weight, desc.float_bias)  # type: ignore[arg-type]
    elif desc.kind == "linear":
        y = F.linear(args[0], desc.float_weight, desc.float_bias)
    elif desc.kind == "act":
        y = mod.act(*args)
    elif desc.kind == "matmul":
        y = torch.matmul(args[0], args[1])
    elif desc.kind == "add":
        y = args[0] + args[1]
    elif desc.kind == "cat":
        y = torch.cat(list(args[0]), dim=desc.dim)
    elif desc.kind == "float":
        y = mod.module(*args, **kwargs)
    else:  # pragma: no cover
        raise ValueError(f"{desc.name}: no float forward for kind {desc.kind}")
    return torch.relu(y) if desc.relu else y


def grid_summary(converted: ConvertedModel) -> list[dict[str, Any]]:
    """One row per layer: kind, integer or float island, input / output scales and bits."""
    rows = []
    for d in converted.layers.values():
        rows.append(
            {
                "name": d.name,
                "kind": d.kind,
                "integer": d.on_integer_kernel,
                "inputs": [
                    None if g is None else (g.scale, g.zero_point, g.bits) for g in d.inputs
                ],
                "output": None
                if d.output is None
                else (d.output.scale, d.output.zero_point, d.output.bits),
                "weight_bits": None if d.weight is None else d.weight.bits,
            }
        )
    return rows


def reference_forward(desc: LayerDesc, *tensors: torch.Tensor) -> torch.Tensor:
    """An integer layer's result computed in float from its description alone.

    Dequantized weights and bias (``int · scale``), the float op, then quantize / dequantize
    on the output grid: what the integer kernels compute, up to float rounding at ties. Uses
    no module parameters, so an exporter can run it while tracing.
    """
    if desc.kind == "conv":
        assert desc.conv is not None
        c = desc.conv
        y = F.conv2d(
            tensors[0],
            desc.float_weight,
            desc.dequantized_bias,
            c["stride"],
            c["padding"],
            c["dilation"],
            c["groups"],
        )
    elif desc.kind == "linear":
        y = F.linear(tensors[0], desc.float_weight, desc.dequantized_bias)
    elif desc.kind == "add":
        y = tensors[0] + tensors[1]
    elif desc.kind == "cat":
        y = torch.cat(list(tensors), dim=desc.dim)
    elif desc.kind == "matmul":
        y = torch.matmul(tensors[0], tensors[1])
    else:
        raise ValueError(f"{desc.name}: {desc.kind} is not an integer layer")
    if desc.output is None:
        return torch.relu(y) if desc.relu else y
    grid = desc.output
    return (grid.quantize(y, relu=desc.relu).float() - grid.zero_point) * grid.scale
