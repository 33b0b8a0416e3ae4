"""CIFAR-style ResNet-20/32/56 (He et al. 2016, section 4.2), with option-B shortcuts.

Three stages of ``n`` basic blocks at 16/32/64 channels (depth ``6n + 2``), the second and third
stage starting with stride 2. The shortcut is a 1x1 conv + BN where the shape changes (option B;
the paper's CIFAR models used zero-padding, option A, which has no clean integer form).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.models.layers import BasicBlock, check_common, check_positive_int, conv_bn, init_weights
from qat.models.registry import register_model

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet56"]


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` for small images.

    Layer names (for per-layer overrides by name pattern): first conv ``stem.0``, last layer
    ``fc`` (``nn.Linear``); also available as ``first_conv_name`` / ``classifier_name``.
    Structure: ``stem`` → ``layer1..3`` (``BasicBlock`` each) → ``pool`` → ``flatten`` → ``fc``.

    Args:
        depth: 20, 32, 56, ... (any ``6n + 2``).
        num_classes: output classes.
        in_channels: input image channels.
        image_size: input height/width; any size >= 1 works (global pooling), it is validated
            only.
        base_width: channels of the first stage (16 in the paper; the stages use 1x, 2x, 4x).
    """

    first_conv_name = "stem.0"
    classifier_name = "fc"

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        base_width: int = 16,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, image_size)
        check_positive_int("base_width", base_width)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth!r}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        n = (depth - 2) // 6
        widths = (base_width, 2 * base_width, 4 * base_width)
        self.stem = conv_bn(in_channels, widths[0], 3)
        self.layer1 = self._stage(widths[0], widths[0], n, stride=1)
        self.layer2 = self._stage(widths[0], widths[1], n, stride=2)
        self.layer3 = self._stage(widths[1], widths[2], n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


@register_model
def resnet20(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, base_width: int = 16
) -> CifarResNet:
    """ResNet-20 (0.27 M parameters at 10 classes): 3 stages x 3 blocks. See :class:`CifarResNet`."""
    return CifarResNet(20, num_classes, in_channels, image_size, base_width)


@register_model
def resnet32(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, base_width: int = 16
) -> CifarResNet:
    """ResNet-32: 3 stages x 5 blocks. See :class:`CifarResNet`."""
    return CifarResNet(32, num_classes, in_channels, image_size, base_width)


@register_model
def resnet56(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, base_width: int = 16
) -> CifarResNet:
    """ResNet-56: 3 stages x 9 blocks. See :class:`CifarResNet`."""
    return CifarResNet(56, num_classes, in_channels, image_size, base_width)
