"""LightningDataModules for image classification (without torchvision) and byte-level text.

Every DataModule takes ``data_dir``, ``batch_size``, ``num_workers``, ``val_fraction``, ``seed``
and ``augment``; exposes ``num_classes``, ``in_channels``, ``image_size`` (to size the model),
``mean``/``std`` and ``classes``; and has ``check()``, which finds the data (or raises
``FileNotFoundError`` saying how to get it) without loading it.

Example:
    >>> from qat.data import DigitsDataModule
    >>> dm = DigitsDataModule(batch_size=32, image_size=16)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))  # x: (32, 1, 16, 16)
"""

from qat.data.base import BaseDataModule, TensorImageDataset
from qat.data.cifar10 import CIFAR10DataModule
from qat.data.digits import DigitsDataModule
from qat.data.fashion_mnist import FashionMNISTDataModule, find_fashion_mnist, read_idx
from qat.data.imagefolder import ImageFolderDataModule
from qat.data.text import TextDataModule

__all__ = [
    "BaseDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "TensorImageDataset",
    "TextDataModule",
    "find_fashion_mnist",
    "read_idx",
]
