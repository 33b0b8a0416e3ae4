"""ResNet-18 for small images (CIFAR-style stem: one 3x3 stride-1 conv, no max-pool).

The ImageNet ResNet-18's 7x7 stride-2 stem and max-pool would shrink a 32x32 image to 8x8 before
the first block; the small-image variant keeps the resolution (as in most CIFAR ResNet-18s).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.models.layers import BasicBlock, check_common, check_positive_int, conv_bn, init_weights
from qat.models.registry import register_model

__all__ = ["ResNet", "resnet18"]


class ResNet(nn.Module):
    """Four-stage basic-block ResNet for small images.

    Layer names: first conv ``stem.0``, last layer ``fc`` (``nn.Linear``); also available as
    ``first_conv_name`` / ``classifier_name``. Structure: ``stem`` → ``layer1..4`` →
    ``pool`` → ``flatten`` → ``fc``.

    Args:
        blocks: basic blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: output classes.
        in_channels: input image channels.
        image_size: input height/width; any size >= 1 works (global pooling), validated only.
        base_width: channels of the first stage (64; stages use 1x, 2x, 4x, 8x). Smaller values
            make quick experiments cheap.
    """

    first_conv_name = "stem.0"
    classifier_name = "fc"

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, image_size)
        check_positive_int("base_width", base_width)
        if len(blocks) != 4:
            raise ValueError(f"blocks must give 4 stage lengths, got {blocks!r}")
        for b in blocks:
            check_positive_int("blocks[i]", b)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        widths = [base_width * 2**i for i in range(4)]
        self.stem = conv_bn(in_channels, widths[0], 3)
        stages = []
        in_w = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(in_w, w, stride), *[BasicBlock(w, w) for _ in range(n - 1)]
                )
            )
            in_w = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


@register_model
def resnet18(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, base_width: int = 64
) -> ResNet:
    """ResNet-18 for small images (11.2 M parameters at 10 classes). See :class:`ResNet`."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, image_size, base_width)
