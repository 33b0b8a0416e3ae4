"""LeNet-5 (LeCun et al. 1998) with batch norm, sized from the input image.

Both 5x5 convs use "same" padding, so every input size >= 4 works: 28x28 (Fashion-MNIST),
32x32, or the 8x8 digits. The first fully connected layer is sized from ``image_size``
(``16 * (image_size // 4) ** 2`` inputs), so the model must be fed images of that size.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.models.layers import check_common, conv_bn, init_weights
from qat.models.registry import register_model

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """conv(6)-BN-ReLU → max-pool → conv(16)-BN-ReLU → max-pool → fc 120 → fc 84 → fc.

    Layer names: first conv ``stem.0``, last layer ``fc`` (``nn.Linear``); also available as
    ``first_conv_name`` / ``classifier_name``. Structure: ``stem`` → ``pool1`` → ``conv2`` →
    ``pool2`` → ``flatten`` → ``fc1`` (Linear-ReLU) → ``fc2`` (Linear-ReLU) → ``fc``.

    Args:
        num_classes: output classes.
        in_channels: input image channels.
        image_size: input height/width (>= 4); sizes the first fully connected layer.
    """

    first_conv_name = "stem.0"
    classifier_name = "fc"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        check_common(num_classes, in_channels, image_size, min_size=4)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.stem = conv_bn(in_channels, 6, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = conv_bn(6, 16, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side = image_size // 2 // 2
        self.fc1 = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
        self.fc = nn.Linear(84, num_classes)
        init_weights(self)
        # Hidden Linear layers feed ReLUs: use He init there, not the small classifier init.
        for m in (self.fc1[0], self.fc2[0]):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.stem(x))))
        return self.fc(self.fc2(self.fc1(self.flatten(x))))


@register_model
def lenet5(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """LeNet-5 with BN. See :class:`LeNet5`."""
    return LeNet5(num_classes, in_channels, image_size)
