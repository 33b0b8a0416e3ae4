"""Fashion-MNIST (Xiao et al. 2017) from the original IDX files, without torchvision.

Looks for the four files (gzipped or not) in this order, and stops at the first complete set:

1. ``data_dir`` (also ``data_dir/fashion-mnist`` and torchvision's ``data_dir/FashionMNIST/raw``);
2. ``/usr/share/datasets/fashion-mnist``, where ``apt-get install dataset-fashion-mnist`` puts them
   (:data:`DEBIAN_DIR`; the environment variable ``QAT_FASHION_MNIST_DEBIAN_DIR`` moves it, e.g.
   to a missing folder to test as on a machine without the package);
3. a download from the Zalando mirrors into ``data_dir`` (when ``download=True``).

:meth:`FashionMNISTDataModule.check` does just this lookup, so a pipeline can fail before any
work when the data is missing.
"""

from __future__ import annotations

import gzip
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from qat.data.base import BaseDataModule
from qat.data.transforms import Transform, pad_to

__all__ = [
    "DEBIAN_DIR",
    "FILES",
    "MIRRORS",
    "PACKAGE_DIR",
    "FashionMNISTDataModule",
    "find_fashion_mnist",
    "read_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Where the loader looks for the package's files: :data:`PACKAGE_DIR`, unless the environment
#: variable ``QAT_FASHION_MNIST_DEBIAN_DIR`` names another folder (read at import).
DEBIAN_DIR = Path(os.environ.get("QAT_FASHION_MNIST_DEBIAN_DIR") or PACKAGE_DIR)
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a numpy array of its stored shape.

    Raises:
        ValueError: the file is not IDX (bad magic number or truncated).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        # Detect gzip by its magic bytes, not the name: downloads land in ``*.part`` files first.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({header + count * dtype.itemsize} bytes), "
            f"file has {len(raw)} bytes (truncated or corrupt download?)"
        )
    return (
        np.frombuffer(raw, dtype, count=count, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find_in(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The four files found in ``directory`` (``.gz`` preferred), and the names missing."""
    found, missing = {}, []
    for key, name in FILES.items():
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` via a temporary file (no half-written file on failure)."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
        read_idx(part)  # a captive portal's HTML page must not pass for a dataset file
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)


def _download(data_dir: Path, names: list[str], timeout: float) -> str | None:
    """Download ``names`` (.gz) into ``data_dir``; the last error as text, or None on success."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        errors = []
        for mirror in MIRRORS:
            try:
                _fetch(f"{mirror}{name}.gz", data_dir / f"{name}.gz", timeout)
                break
            except (OSError, ValueError, urllib.error.URLError) as err:
                errors.append(f"{mirror}{name}.gz: {err}")
        else:
            # Offline machines fail on the first file; do not wait on every other one too.
            return "; ".join(errors)
    return None


def find_fashion_mnist(
    data_dir: str | Path, download: bool = True, timeout: float = 10.0
) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST files: ``data_dir``, then the Debian package, then download.

    Returns:
        ``{"train_images": ..., "train_labels": ..., "test_images": ..., "test_labels": ...}``.

    Raises:
        FileNotFoundError: none of the three ways worked; the message says how to fix it.
    """
    data_dir = Path(data_dir).expanduser()
    local = (data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw")
    for directory in (*local, DEBIAN_DIR):
        found, missing = _find_in(directory)
        if not missing:
            return found
    _, missing_local = _find_in(data_dir)
    if download:
        error = _download(data_dir, missing_local, timeout)
        found, missing = _find_in(data_dir)
        if error is None and not missing:
            return found
        tried = f"the download from {MIRRORS[0]} failed ({error})"
    else:
        tried = "download=False"
    raise FileNotFoundError(
        f"Fashion-MNIST not found: not in {data_dir} (missing {', '.join(missing_local)}), "
        f"not in {DEBIAN_DIR}, and {tried}. Get it one of three ways: "
        f"(1) put {', '.join(n + '.gz' for n in FILES.values())} (gzipped or not) in {data_dir}; "
        "(2) `sudo apt-get install dataset-fashion-mnist` (installs them in "
        f"{PACKAGE_DIR}); (3) allow the download (download=True, with internet access)."
    )


class FashionMNISTDataModule(BaseDataModule):
    """Fashion-MNIST: 60k train / 10k test grayscale 28x28 images, 10 classes.

    Attributes: ``num_classes`` 10, ``in_channels`` 1, ``image_size`` (28, or what was asked),
    ``classes``, ``mean``/``std``.

    Args:
        data_dir: where to look for (and download) the IDX files.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_fraction: part of the 60k training images held out for validation (seeded).
        seed: seed of the train/val split.
        augment: random crop with ``crop_padding`` (and flip if ``hflip``) on the training split.
        image_size: 28 (native) or larger: zero-padded symmetrically, e.g. 32 for the ResNets.
        crop_padding: padding of the random crop.
        hflip: random horizontal flips too (off by default, as is usual for Fashion-MNIST).
        download: try the Zalando mirrors when the files are nowhere local.
        download_timeout: seconds per request before giving up.

    Example:
        >>> dm = FashionMNISTDataModule("data", image_size=32)
        >>> dm.check()  # fails now, not after an hour, when the data is missing
    """

    num_classes = 10
    in_channels = 1
    mean = (0.2860,)
    std = (0.3530,)
    classes = CLASSES

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 5000 / 60000,
        seed: int = 0,
        augment: bool = True,
        image_size: int = 28,
        crop_padding: int = 2,
        hflip: bool = False,
        download: bool = True,
        download_timeout: float = 10.0,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, seed, augment)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 28:
            raise ValueError(
                f"image_size must be an int >= 28 (28 native, 32 padded), got {image_size!r}"
            )
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.image_size = image_size
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.download = download
        self.download_timeout = download_timeout
        self._files: dict[str, Path] | None = None

    def check(self) -> dict[str, Path]:
        """Locate (or download) the four files; see :func:`find_fashion_mnist`."""
        if self._files is None:
            self._files = find_fashion_mnist(self.data_dir, self.download, self.download_timeout)
        return self._files

    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if split == "val":
            return None
        files = self.check()
        prefix = "train" if split == "train" else "test"
        images = read_idx(files[f"{prefix}_images"])
        labels = read_idx(files[f"{prefix}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} files disagree: images {images.shape}, labels "
                f"{labels.shape} ({files[f'{prefix}_images']}, {files[f'{prefix}_labels']})"
            )
        x = torch.from_numpy(images.astype(np.uint8, copy=False)).unsqueeze(1)
        if self.image_size != x.shape[-1]:
            x = pad_to(x, self.image_size)
        return x, torch.from_numpy(labels.astype(np.int64))

    def train_transform(self) -> Transform:
        return self._augmented(self.crop_padding, self.hflip)
