"""Float models by name (timm-style); no quantization inside.

Example:
    >>> from qat.models import create_model
    >>> model = create_model("resnet20", num_classes=10, in_channels=3)

Every model takes ``num_classes``, ``in_channels`` and ``image_size``, and names its first conv
``stem.0`` and its last ``nn.Linear`` ``fc`` (class attributes ``first_conv_name`` and
``classifier_name``), so per-layer overrides by name pattern work across models. Each model
also keeps ``num_classes``, ``in_channels`` and ``image_size`` as attributes, so an exporter can
build its example input, ``torch.randn(1, m.in_channels, m.image_size, m.image_size)``.
The language model ``gpt`` takes token ids instead (``vocab_size``, ``context_length``).
"""

from qat.models import gpt, lenet, mobilenetv2, resnet, resnet_cifar, timm_models, vit  # noqa: F401
from qat.models.gpt import GPT
from qat.models.lenet import LeNet5
from qat.models.mobilenetv2 import MobileNetV2
from qat.models.registry import create_model, list_models, register_model
from qat.models.resnet import ResNet
from qat.models.resnet_cifar import CifarResNet
from qat.models.vit import VisionTransformer

__all__ = [
    "GPT",
    "CifarResNet",
    "LeNet5",
    "MobileNetV2",
    "ResNet",
    "VisionTransformer",
    "create_model",
    "list_models",
    "register_model",
]
