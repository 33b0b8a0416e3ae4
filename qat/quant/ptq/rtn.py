"""Round-to-nearest post-training quantization of the weights (the baseline of the table)."""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.ptq.common import linear_layers, rows_of, rtn_weight, set_weight


@torch.no_grad()
def rtn(model: nn.Module) -> list[str]:
    """Quantize every linear layer's weights to nearest with their observed (min/max, or GGUF)
    scales, and freeze them there. Embedding tables are left to their own quantizers.

    Returns:
        The names of the layers quantized.
    """
    layers = linear_layers(model)
    for name, layer in layers.items():
        values, scales = rtn_weight(rows_of(layer), layer.weight_quant)
        set_weight(layer, values, scales, name)
    return list(layers)
