"""Bias-aware QAT: train each integer layer with its bias on the runtimes' int32 grid.

The integer runtimes add a conv / linear bias as int32 at scale ``s_in · s_w`` (input scale
times weight scale), and :func:`qat.export.snap_bias` rounds the trained float bias onto that
grid before the test and the export. Where the grid is coarse next to the output step
(MobileNetV2's depthwise convs at W2A2: ``s_in · s_w`` up to twice the 2-bit output step), that
rounding moved the outputs by 0.13–0.19 of a step on average and a 3-epoch run fell from 60%
validation accuracy to 27% on test. Training with the bias already on the grid removes that
gap: validation measures what the runtimes compute, and the snap changes nothing. (It did not
make the model better: a MobileNetV2 W2A2 table run tested at 68.29% with it, 69.04%
without, where validation had read 74.1% before the snap.)

A layer's weight quantizer is its own, but its input's quantizer belongs to whichever layer
produced the tensor, so :func:`link_bias_quantizers` finds it the way the exporters do (one
traced batch, :func:`qat.export.convert.trace_grids`) and stores it on the layer as
``bias_input_quant``: a plain reference, not a submodule, so state dicts and module lists are
unchanged. The forward (:func:`qat.modules.grid_bias`) reads both scales live, rounds the bias
with a straight-through gradient and, for conv+BN training on batch statistics, adds the same
per-channel shift to the batch-norm output.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qat.export.convert import trace_grids
from qat.modules import BIAS_INPUT_QUANT, QConv2d, QConvBn2d, QLinear


def link_bias_quantizers(model: nn.Module, example_input: Any) -> list[str]:
    """Link every quantized conv / linear with a bias to the quantizer of its input.

    Run it whenever the set of enabled activation quantizers may have changed (the
    :class:`qat.callbacks.QATCallback` does at the first batch of each quantized epoch): a
    layer whose input is on no grid (input quantization off or not calibrated yet, or a float
    producer) is unlinked, and keeps a float bias.

    Args:
        model: a prepared model.
        example_input: one batch as the model takes it (runs once in eval mode).

    Returns:
        The names of the linked layers.
    """
    calls, _, _, _ = trace_grids(model, example_input)
    linked = []
    for name, mod in model.named_modules():
        if not isinstance(mod, QConv2d | QConvBn2d | QLinear):
            continue
        grids = {entry[0] for entry in calls.get(name, ())}
        source = None
        if len(grids) == 1:
            (only,) = grids
            if len(only) == 1 and only[0] is not None:
                source = only[0].source
        has_bias = isinstance(mod, QConvBn2d) or mod.bias is not None
        quant = model.get_submodule(source) if source is not None and has_bias else None
        # Not setattr: nn.Module would register the quantizer as a second parent's submodule.
        mod.__dict__[BIAS_INPUT_QUANT] = quant
        if quant is not None:
            linked.append(name)
    return linked
