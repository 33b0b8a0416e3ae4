"""Shared machinery of the DataModules: argument checks, seeded splits, datasets, loaders.

A subclass says how to load each split (:meth:`BaseDataModule._load_split`) and what its images
are (``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``); the base class turns
that into train / val / test datasets and DataLoaders:

- no native validation split → a seeded ``val_fraction`` of the training split (without
  augmentation); ``val_fraction=0`` → validate on the test split;
- augmentation only on the training split;
- :meth:`check` finds the files (or fails with a message saying how to get them) without loading
  anything, so a pipeline can fail before any work when data is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from qat.data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, Transform

__all__ = ["BaseDataModule", "TensorImageDataset"]


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` with labels ``(N,)``.

    uint8 images are scaled to [0, 1] per sample (keeps memory at one byte per pixel); float
    images are taken as already in [0, 1]. ``transform`` then runs on the float ``(C, H, W)``.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Transform | None = None
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class BaseDataModule(LightningDataModule):
    """Base of the image-classification DataModules.

    Attributes (set by subclasses; read them to size the model):
        num_classes: number of classes.
        in_channels: image channels (1 or 3).
        image_size: height = width of the images the loaders yield.
        mean, std: per-channel normalization.
        classes: class names, index = label.

    Args:
        data_dir: where the dataset files live (or go).
        batch_size: samples per batch (all loaders).
        num_workers: DataLoader worker processes (0 = load in the main process; workers are kept
            alive between epochs when > 0).
        val_fraction: fraction of the training split held out for validation (seeded), when the
            dataset has no validation split of its own; 0 → validate on the test split.
        seed: seed of the train/val split (independent of the global seed, so the split never
            changes with the training seed).
        augment: random crop (and flip, where the dataset allows) on the training split.
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        # Collects the subclass's __init__ arguments too; stored in checkpoints, not logged twice.
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.augment = augment
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---- what subclasses provide -------------------------------------------------------------

    def check(self) -> Any:
        """Make sure the data is there (downloading where allowed) without loading it.

        Raises:
            FileNotFoundError: with a message that says how to get the data.
        """
        return None

    def _load_split(self, split: str) -> Any | None:
        """Load ``"train"``, ``"val"`` or ``"test"``; ``None`` if the dataset has no such split.

        The default datasets take ``(images, labels)`` tensors; override :meth:`_dataset` for
        another source type.
        """
        raise NotImplementedError

    def _dataset(self, source: Any, indices: torch.Tensor | None, train: bool) -> Dataset:
        """Dataset over ``source`` (optionally a subset), with train or eval transforms."""
        images, labels = source
        if indices is not None:
            images, labels = images[indices], labels[indices]
        transform = self.train_transform() if train else self.eval_transform()
        return TensorImageDataset(images, labels, transform)

    def _source_len(self, source: Any) -> int:
        return len(source[1])

    def train_transform(self) -> Transform:
        """Augmentation (when ``augment``) then normalization. Subclasses choose the ops."""
        return self.eval_transform()

    def eval_transform(self) -> Transform:
        return Normalize(self.mean, self.std)

    def _augmented(self, crop_padding: int, hflip: bool) -> Transform:
        if not self.augment:
            return self.eval_transform()
        ops: list[Transform] = []
        if crop_padding > 0:
            ops.append(RandomCrop(self.image_size, crop_padding))
        if hflip:
            ops.append(RandomHorizontalFlip())
        return Compose([*ops, Normalize(self.mean, self.std)])

    # ---- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Runs once per node (Lightning): locate or download the files."""
        self.check()

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (idempotent; datasets are built once)."""
        if stage in (None, "fit", "validate") and (self.train_set is None or self.val_set is None):
            self._setup_fit()
        if stage in (None, "test", "predict") and self.test_set is None:
            self._setup_test()

    def _setup_fit(self) -> None:
        train = self._load_split("train")
        val = self._load_split("val")
        if val is not None:
            self.train_set = self._dataset(train, None, train=True)
            self.val_set = self._dataset(val, None, train=False)
        elif self.val_fraction > 0:
            train_idx, val_idx = self.split_indices(self._source_len(train))
            self.train_set = self._dataset(train, train_idx, train=True)
            self.val_set = self._dataset(train, val_idx, train=False)
        else:
            self.train_set = self._dataset(train, None, train=True)
            self._setup_test()
            self.val_set = self.test_set

    def _setup_test(self) -> None:
        test = self._load_split("test")
        if test is not None:
            self.test_set = self._dataset(test, None, train=False)
            return
        # No test split of its own (e.g. ImageNet-style train/ + val/): test on validation.
        if self.val_set is None:
            if self.val_fraction == 0 and self._load_split("val") is None:
                raise ValueError(
                    f"{type(self).__name__} has neither a validation nor a test split here: "
                    "set val_fraction > 0 to hold one out"
                )
            self._setup_fit()
        self.test_set = self.val_set

    def split_indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded (train, val) index split of ``n`` samples by ``val_fraction``."""
        n_val = min(max(1, round(n * self.val_fraction)), n - 1) if self.val_fraction > 0 else 0
        if n < 2 and n_val:
            raise ValueError(f"cannot split {n} sample(s) into train and val; set val_fraction=0")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def _loader(self, dataset: Dataset | None, train: bool = False) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=False,
            persistent_workers=self.num_workers > 0,
            # Full training batches only: a last batch of one sample breaks BatchNorm on 1x1
            # maps and skews batch statistics / observer ranges under QAT.
            drop_last=train and len(dataset) > self.batch_size,
        )

    # The loaders set themselves up when called outside a Trainer (plain Python loops).
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def check_stats(
    name: str, values: Sequence[float] | None, channels: int
) -> tuple[float, ...] | None:
    """Validate a user-given mean/std: one value per channel."""
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise ValueError(f"{name} needs {channels} value(s) (one per channel), got {values!r}")
    return values
