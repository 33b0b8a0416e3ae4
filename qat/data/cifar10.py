"""CIFAR-10 from the "python version" pickle batches (``cifar-10-batches-py``), no torchvision.

No download: fetch ``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html
and extract it into ``data_dir``. The batches are unpickled with a restricted unpickler that only
rebuilds numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from qat.data.base import BaseDataModule
from qat.data.transforms import Transform

__all__ = ["CIFAR10DataModule", "find_cifar10", "read_cifar_batch"]

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# What a CIFAR batch needs to rebuild its arrays (numpy 1.x and 2.x module paths); nothing
# here can run code.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Python 3 writes bytes at pickle protocol <= 2 as codecs.encode(str, "latin1").
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}; refusing it")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch → images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # The batches were written by Python 2: byte-string keys.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {err}") from err
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (keys {sorted(batch)})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def find_cifar10(data_dir: str | Path) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data_dir/cifar-10-batches-py`` or ``data_dir``.

    Raises:
        FileNotFoundError: with where to put the files and where to get them.
    """
    data_dir = Path(data_dir).expanduser()
    needed = (*TRAIN_BATCHES, TEST_BATCH)
    for folder in (data_dir / FOLDER, data_dir):
        if all((folder / name).is_file() for name in needed):
            return folder
    missing = [n for n in needed if not (data_dir / FOLDER / n).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 not found: {data_dir / FOLDER} lacks {', '.join(missing)}. Download the "
        f"python version ({URL}) and extract it into {data_dir} "
        f"(`tar xzf cifar-10-python.tar.gz -C {data_dir}`), or point data_dir at the folder "
        "that holds cifar-10-batches-py."
    )


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10: 50k train / 10k test RGB 32x32 images, 10 classes.

    Attributes: ``num_classes`` 10, ``in_channels`` 3, ``image_size`` 32, ``classes``,
    ``mean``/``std``.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` (or that folder itself).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_fraction: part of the 50k training images held out for validation (seeded);
            0 → validate on the test set, as many CIFAR papers do.
        seed: seed of the train/val split.
        augment: random crop with ``crop_padding`` and horizontal flip on the training split.
        crop_padding: padding of the random crop (4 is the standard CIFAR recipe).
        hflip: random horizontal flips when augmenting.
    """

    num_classes = 10
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    classes = CLASSES

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        hflip: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, seed, augment)
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.crop_padding = crop_padding
        self.hflip = hflip

    def check(self) -> Path:
        """The batches folder, or ``FileNotFoundError`` saying where to put it."""
        return find_cifar10(self.data_dir)

    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if split == "val":
            return None
        folder = self.check()
        names = TRAIN_BATCHES if split == "train" else (TEST_BATCH,)
        parts = [read_cifar_batch(folder / name) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(images), torch.from_numpy(labels)

    def train_transform(self) -> Transform:
        return self._augmented(self.crop_padding, self.hflip)
