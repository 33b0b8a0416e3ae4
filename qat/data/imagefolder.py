"""Class-per-folder images (ImageNet style), decoded with PIL, resized to ``image_size``.

Two layouts:

- ``data_dir/train/<class>/*.png`` with ``data_dir/val/<class>/...`` (and optionally
  ``data_dir/test/<class>/...``): the folders are the splits; without ``test/`` the test set is
  ``val/`` (ImageNet has no public test labels);
- ``data_dir/<class>/*.png``: one pool, split into train / val by a seeded ``val_fraction``;
  the test set is that validation part.

Images are decoded per sample (the set need not fit in memory): shorter side resized to
``image_size``, center crop, then random crop with padding + flip on the training split.
:meth:`ImageFolderDataModule.check` opens every image file once, up front (``check_images``), so
a corrupt file is an error naming it before training rather than a crash mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from qat.data.base import BaseDataModule, check_stats
from qat.data.transforms import Transform, pil_to_tensor, resize_center_crop

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "find_classes",
    "unreadable_images",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# ImageNet statistics: the usual choice for natural photos of unknown origin.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _images_under(folder: Path) -> list[Path]:
    # Sorted so the sample order (and hence the seeded split) is the same on every machine.
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
    )


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold at least one image."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and _images_under(d)
    )


def unreadable_images(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """The files PIL cannot open, each with the reason.

    Each file's header is parsed and PIL's ``verify()`` run (chunk checksums for PNG, a file
    cut short, ...), without decoding the pixels: about 30-40 µs a file on this CPU.
    """
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            text = str(err).replace(str(path), "").replace("''", "").strip(" :")
            bad.append((path, text or type(err).__name__))
    return bad


class ImageFileDataset(Dataset):
    """``(path, label)`` samples decoded with PIL to ``(C, image_size, image_size)`` in [0, 1]."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        image_size: int,
        in_channels: int = 3,
        transform: Transform | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.mode = "L" if in_channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = resize_center_crop(img.convert(self.mode), self.image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            # What check() cannot see without decoding (pixel data damaged behind a sound
            # header): still name the file, from inside a DataLoader worker too.
            raise OSError(f"cannot decode image {path}: {err}; remove or replace it") from err
        x = pil_to_tensor(img).float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(label, dtype=torch.long)


class ImageFolderDataModule(BaseDataModule):
    """Images in class-per-folder layout (see the module docstring for the two layouts).

    Attributes: ``num_classes`` and ``classes`` (from the training folder's sub-folders,
    sorted; read lazily, so the folder must exist when they are read), ``in_channels``,
    ``image_size``, ``mean``/``std``.

    Args:
        data_dir: the dataset root.
        batch_size: samples per batch.
        num_workers: DataLoader workers (decoding is the bottleneck: use them).
        val_fraction: held-out part of the pool when there is no ``val/`` folder.
        seed: seed of that split.
        augment: random crop with padding and horizontal flip on the training split.
        image_size: side of the square images the loaders yield.
        in_channels: 3 (RGB) or 1 (grayscale); images are converted.
        crop_padding: padding of the random crop; default ``image_size // 8`` (4 at 32).
        hflip: random horizontal flips when augmenting.
        mean: per-channel mean; default ImageNet's (its average for grayscale).
        std: per-channel std; default ImageNet's (its average for grayscale).
        check_images: open every image file in :meth:`check` (:func:`unreadable_images`:
            30-40 µs a file here, under a minute for ImageNet's 1.3M files when cached, longer
            from a cold or network disk); off, a corrupt file is found when a DataLoader
            decodes it, mid-epoch.
    """

    def __init__(
        self,
        data_dir: str | Path = "data/imagefolder",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        image_size: int = 32,
        in_channels: int = 3,
        crop_padding: int | None = None,
        hflip: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        check_images: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, seed, augment)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
        if crop_padding is None:
            crop_padding = image_size // 8
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.crop_padding = crop_padding
        self.hflip = hflip
        gray = in_channels == 1
        self.mean = check_stats("mean", mean, in_channels) or (
            (sum(IMAGENET_MEAN) / 3,) if gray else IMAGENET_MEAN
        )
        self.std = check_stats("std", std, in_channels) or (
            (sum(IMAGENET_STD) / 3,) if gray else IMAGENET_STD
        )
        self.check_images = check_images
        self._classes: tuple[str, ...] | None = None
        self._images_checked = False

    # ---- layout ------------------------------------------------------------------------------

    def _split_dirs(self) -> dict[str, Path | None]:
        root = self.data_dir
        if (root / "train").is_dir():
            return {
                "train": root / "train",
                "val": root / "val" if (root / "val").is_dir() else None,
                "test": root / "test" if (root / "test").is_dir() else None,
            }
        return {"train": root, "val": None, "test": None}

    def check(self) -> Path:
        """The training folder, once its images are known to open.

        Raises:
            FileNotFoundError: no class folders with images (the message gives the layout).
            ValueError: image files PIL cannot open (with ``check_images``), each named.
        """
        train = self._split_dirs()["train"]
        assert train is not None
        if not find_classes(train):
            root = self.data_dir
            raise FileNotFoundError(
                f"no class folders with images under {train}: put images as "
                f"{root}/train/<class>/<image>.png (with {root}/val/<class>/...), or "
                f"{root}/<class>/<image>.png to split by val_fraction; extensions: "
                f"{', '.join(IMG_EXTENSIONS)}"
            )
        if self.check_images and not self._images_checked:
            self._check_images()
            self._images_checked = True
        return train

    def _check_images(self) -> None:
        # Checked up front, not skipped at load time: a bad file met by a DataLoader worker
        # ends the run mid-epoch, after the work; skipping it there would quietly train on
        # another data set than the folders hold (and shift every later batch). So every file
        # is opened once here, and all the bad ones are named in one error.
        paths = [
            p
            for folder in self._split_dirs().values()
            if folder is not None
            for name in find_classes(folder)
            for p in _images_under(folder / name)
        ]
        bad = unreadable_images(paths)
        if bad:
            shown = "; ".join(f"{p} ({why})" for p, why in bad[:3])
            more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise ValueError(
                f"{len(bad)} of {len(paths)} image files cannot be read: {shown}{more}. "
                "Remove or replace them (data.check_images=false skips this check)"
            )

    @property
    def classes(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._classes is None:
            self._classes = tuple(find_classes(self.check()))
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    # ---- datasets ----------------------------------------------------------------------------

    def _load_split(self, split: str) -> list[tuple[Path, int]] | None:
        folder = self._split_dirs()[split]
        if folder is None:
            return None
        index = {name: i for i, name in enumerate(self.classes)}
        extra = sorted(set(find_classes(folder)) - set(index))
        if extra:
            raise ValueError(
                f"{folder} has classes the training folder lacks: {', '.join(extra)}; "
                "every class needs training images (or remove those folders)"
            )
        samples = [(p, i) for name, i in index.items() for p in _images_under(folder / name)]
        if not samples:
            raise FileNotFoundError(f"no images under {folder}/<class>/")
        return samples

    def _source_len(self, source: Any) -> int:
        return len(source)

    def _dataset(self, source: Any, indices: torch.Tensor | None, train: bool) -> Dataset:
        samples = source if indices is None else [source[i] for i in indices.tolist()]
        transform = self.train_transform() if train else self.eval_transform()
        return ImageFileDataset(samples, self.image_size, self.in_channels, transform)

    def train_transform(self) -> Transform:
        return self._augmented(self.crop_padding, self.hflip)
