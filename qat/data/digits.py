"""scikit-learn's 8x8 handwritten digits: 1797 images shipped inside the wheel (no files, no
network), the tiny set for tests and smoke runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from qat.data.base import BaseDataModule
from qat.data.transforms import Transform

__all__ = ["DigitsDataModule"]


class DigitsDataModule(BaseDataModule):
    """Digits 0-9 as 1-channel images in [0, 1] (the raw 0..16 values / 16).

    There is no official split: a seeded ``test_fraction`` is the test set, then a seeded
    ``val_fraction`` of the rest is the validation set; the same seed always gives the same split.

    Attributes: ``num_classes`` 10, ``in_channels`` 1, ``image_size`` (8, or what was asked),
    ``classes``, ``mean``/``std``.

    Args:
        data_dir: unused (the data ships with scikit-learn); accepted so every DataModule takes
            the same arguments.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_fraction: part of the non-test images held out for validation.
        seed: seed of the splits.
        augment: random crop with ``crop_padding`` on the training split (off by default: smoke
            runs and tests want determinism).
        image_size: 8 (native) or another size, resized with ``resize_mode`` (e.g. 16 or 32 so
            models built for larger images run on it).
        test_fraction: part of the 1797 images used as the test set.
        resize_mode: ``"bilinear"`` or ``"nearest"`` (``F.interpolate`` mode).
        crop_padding: padding of the random crop.
    """

    num_classes = 10
    in_channels = 1
    mean = (0.3053,)
    std = (0.3760,)
    classes = tuple(str(i) for i in range(10))

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = False,
        image_size: int = 8,
        test_fraction: float = 0.2,
        resize_mode: str = "bilinear",
        crop_padding: int = 1,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, seed, augment)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"image_size must be an int >= 2, got {image_size!r}")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float):
            raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
        if not 0 < test_fraction < 1 or test_fraction + val_fraction >= 1:
            raise ValueError(
                f"test_fraction must be in (0, 1) and leave training data next to "
                f"val_fraction={val_fraction}, got {test_fraction!r}"
            )
        if resize_mode not in ("bilinear", "nearest"):
            raise ValueError(f"resize_mode must be 'bilinear' or 'nearest', got {resize_mode!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.image_size = image_size
        self.test_fraction = float(test_fraction)
        self.resize_mode = resize_mode
        self.crop_padding = crop_padding
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test_mask: torch.Tensor | None = None

    def _load_all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._data is None:
            # Imported here: scikit-learn is only needed by this DataModule.
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            if self.image_size != x.shape[-1]:
                kwargs = {"align_corners": False} if self.resize_mode == "bilinear" else {}
                x = F.interpolate(x, size=self.image_size, mode=self.resize_mode, **kwargs)
                x = x.clamp_(0.0, 1.0)
            y = torch.as_tensor(digits.target, dtype=torch.int64)
            n = len(y)
            n_test = max(1, round(n * self.test_fraction))
            # A generator of its own (seed + 1) so the test draw never correlates with val's.
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1))
            test_mask = torch.zeros(n, dtype=torch.bool)
            test_mask[perm[:n_test]] = True
            self._data, self._test_mask = (x, y), test_mask
        assert self._test_mask is not None
        return self._data[0], self._data[1], self._test_mask

    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if split == "val":
            return None
        x, y, test = self._load_all()
        keep = test if split == "test" else ~test
        return x[keep], y[keep]

    def train_transform(self) -> Transform:
        return self._augmented(self.crop_padding, hflip=False)  # flipped digits are other digits
