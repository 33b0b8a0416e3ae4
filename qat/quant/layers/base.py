"""What every quantized layer shares: its quantizers, and copying a float layer's parameters."""

from __future__ import annotations

import torch
from torch import nn

from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec, default_activation_spec, default_weight_spec


def weight_quantizer(spec: QuantSpec | None, channels: int, axis: int = 0) -> FakeQuantizer:
    return FakeQuantizer(spec or default_weight_spec(), role="weight", channels=channels, axis=axis)


def output_quantizer(spec: QuantSpec | None) -> FakeQuantizer:
    return FakeQuantizer(spec or default_activation_spec(), role="activation")


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
