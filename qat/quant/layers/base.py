"""What every quantized layer shares: its quantizers, and copying a float layer's parameters."""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec, default_activation_spec, default_weight_spec


def weight_quantizer(
    spec: QuantSpec | None, channels: int, axis: int = 0, shape: tuple[int, ...] | None = None
) -> FakeQuantizer:
    """The weight quantizer; with ``spec.group_size``, one scale per group of the 2-D weight
    ``shape`` along its input dimension (the axis that is not ``axis``)."""
    spec = spec or default_weight_spec()
    if spec.group_size and spec.enabled:
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"group_size={spec.group_size} applies to linear / embedding weights, not to a "
                f"weight of shape {shape}: set group_size=0 for this layer with an override"
            )
        in_axis = 1 - axis
        if shape[in_axis] % spec.group_size:
            raise ValueError(
                f"group_size={spec.group_size} does not divide the input size {shape[in_axis]} "
                f"of a weight {tuple(shape)}: use a divisor, or an override for this layer"
            )
        groups = shape[axis] * (shape[in_axis] // spec.group_size)
        return FakeQuantizer(spec, role="weight", channels=groups, group_axis=in_axis)
    return FakeQuantizer(spec, role="weight", channels=channels, axis=axis)


def output_quantizer(spec: QuantSpec | None) -> FakeQuantizer:
    """The output quantizer; float (pass-through) for dynamic specs, which quantize the
    *inputs* of the layers that read them (:func:`input_quantizer`)."""
    spec = spec or default_activation_spec()
    if spec.dynamic != "none":
        spec = spec.replace(bits=32, dynamic="none", group_size=0, grid="affine")
    return FakeQuantizer(spec, role="activation")


def input_quantizer(spec: QuantSpec | None) -> FakeQuantizer | None:
    """A dynamic spec's quantizer for a layer's input (None for static or float specs)."""
    if spec is None or spec.dynamic == "none" or not spec.enabled:
        return None
    return FakeQuantizer(spec, role="activation")


def conv_kwargs(conv: nn.Conv2d) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def like(new: nn.Module, ref: nn.Module) -> nn.Module:
    p = next(ref.parameters(), None)
    return new.to(device=p.device, dtype=p.dtype) if p is not None else new


def copy_weight_bias(dst: nn.Module, src: nn.Module) -> nn.Module:
    """``dst`` (moved to ``src``'s device/dtype) holding ``src``'s weight and bias."""
    dst = like(dst, src)
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst
