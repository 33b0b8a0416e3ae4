"""MobileNetV2 (Sandler et al. 2018) for small images.

Differences from the ImageNet model, as in the common CIFAR ports: the stem and the second
stage run at stride 1 (a 32x32 input ends at 4x4 rather than 1x1), and activations are
``nn.ReLU`` instead of ReLU6. ReLU6's fixed upper clip fights a learned activation range; a
plain ReLU leaves the range to the quantizer.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.models.layers import check_common, conv_bn, init_weights
from qat.models.registry import register_model
from qat.ops import Add

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]

# (expand ratio t, output channels c, repeats n, first stride s); row 2 has s=1 (ImageNet: 2).
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10% below ``value``."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    """1x1 expand (conv-BN-ReLU) → 3x3 depthwise (conv-BN-ReLU) → 1x1 project (conv-BN).

    ``conv`` holds the three conv-BN units; ``add`` is ``Add()`` (no ReLU after the add: the
    projection is linear) when the block is residual (stride 1, same channels), else ``None``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_channels, hidden, 1))
        layers += [
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False),
        ]
        self.conv = nn.Sequential(*layers)
        self.add = Add() if stride == 1 and in_channels == out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out if self.add is None else self.add(x, out)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images.

    Layer names: first conv ``stem.0``, last layer ``fc`` (``nn.Linear``); also available as
    ``first_conv_name`` / ``classifier_name``. Structure: ``stem`` → ``features``
    (``InvertedResidual`` blocks) → ``head`` (1x1 conv-BN-ReLU) → ``pool`` → ``flatten`` →
    ``dropout`` → ``fc``.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        image_size: input height/width; any size >= 1 works (global pooling), validated only.
        width_mult: channel multiplier (rounded to multiples of 8), e.g. 0.5 or 1.0.
        dropout: dropout probability before ``fc`` (0 for the small-image setting).
    """

    first_conv_name = "stem.0"
    classifier_name = "fc"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, image_size)
        if isinstance(width_mult, bool) or not isinstance(width_mult, int | float):
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        channels = _make_divisible(32 * width_mult)
        last_channels = _make_divisible(1280 * max(1.0, width_mult))
        self.stem = conv_bn(in_channels, channels, 3, stride=1)
        blocks: list[nn.Module] = []
        for t, c, n, s in _SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        self.features = nn.Sequential(*blocks)
        self.head = conv_bn(channels, last_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(last_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


@register_model
def mobilenetv2(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> MobileNetV2:
    """MobileNetV2 for small images (2.2 M parameters at width 1.0). See :class:`MobileNetV2`."""
    return MobileNetV2(num_classes, in_channels, image_size, width_mult, dropout)
