"""Building blocks shared by the model families.

The module swap in :func:`qat.prepare` works by module type and adjacency, with no tracing, so
the models follow three conventions, all enforced here:

- conv → BN (→ ReLU) is one ``nn.Sequential(Conv2d(bias=False), BatchNorm2d, ReLU)`` whose three
  layers are consecutive children (``0``, ``1``, ``2``), so it can be fused by position;
- residual adds go through :class:`qat.ops.Add` (never an inline ``a + b``), so the add gets its
  own output quantizer;
- activations are ``nn.ReLU`` modules (or ``Add(relu=True)``), never ``F.relu``.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.ops import Add

__all__ = ["BasicBlock", "check_common", "check_positive_int", "conv_bn", "init_weights"]


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
    padding: int | None = None,
) -> nn.Sequential:
    """``Sequential(Conv2d(bias=False), BatchNorm2d[, ReLU])``, the fusable unit of every model.

    The conv has no bias because the BN right after it would cancel it (and folding adds one).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: conv stride.
        groups: conv groups (``groups == in_channels == out_channels`` for depthwise).
        relu: append an ``nn.ReLU`` (child ``2``).
        padding: default ``kernel_size // 2`` ("same" for odd kernels at stride 1).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if padding is None else padding,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, shortcut, then ``relu(out + shortcut)``.

    When stride or channel count change, the shortcut is a 1x1 conv + BN (option B of He et al.);
    otherwise it is the identity. Children: ``conv1`` (conv-BN-ReLU), ``conv2`` (conv-BN),
    ``downsample`` (conv-BN or ``None``), ``add`` (``Add(relu=True)``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride=stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3, relu=False)
        # `None` rather than nn.Identity keeps the module list minimal; TorchScript and torch.fx
        # both resolve the `is not None` test at compile/trace time.
        self.downsample = (
            conv_bn(in_channels, out_channels, 1, stride=stride, relu=False)
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.add = Add(relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.add(self.conv2(self.conv1(x)), identity)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise ``ValueError`` naming ``name``."""
    # bool is an int subclass; `in_channels=True` is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_common(
    num_classes: object, in_channels: object, image_size: object, min_size: int = 1
) -> None:
    """Validate the three arguments every model takes."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < min_size:
        raise ValueError(
            f"image_size must be an int >= {min_size} for this model, got {image_size!r}"
        )


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, BN at (1, 0), small normal Linear.

    BN weights are never zero-initialised (a common ResNet trick): under QAT the BN scale is
    folded into the conv weight, and a zero scale would give a zero quantization step.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
