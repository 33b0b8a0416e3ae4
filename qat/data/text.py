"""Byte-level language-modelling data that needs no download: the Python standard library.

:class:`TextDataModule` reads text files (by default the ``.py`` sources of the running
interpreter's standard library, which every Python installation ships), as bytes: the vocabulary
is the 256 byte values, so no tokenizer is needed. Files are shuffled with a fixed seed and
assigned whole to the test, validation and training splits (so no split sees another's files),
then each split's bytes are cut into windows of ``seq_len + 1``: inputs ``x = w[:-1]``,
next-token targets ``y = w[1:]``.

The stdlib differs between Python versions, so results are comparable on one interpreter
version (the results pages name it).
"""

from __future__ import annotations

import os
import random
import sys
import sysconfig
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

__all__ = ["TextDataModule", "TokenWindows", "stdlib_dir"]

#: Folders of the stdlib left out: third-party packages and the test suites (large, repetitive).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_dir() -> Path:
    """The running interpreter's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


class TokenWindows(Dataset):
    """Non-overlapping windows of a byte stream: ``(x, y)`` long tensors of ``seq_len``."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        if len(data) < seq_len + 1:
            raise ValueError(
                f"a split of {len(data)} bytes is shorter than one window of seq_len+1="
                f"{seq_len + 1}: use more data (max_bytes) or a smaller seq_len"
            )
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.data[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class TextDataModule(LightningDataModule):
    """Next-token prediction on bytes of text files (the stdlib's sources by default).

    Attributes:
        vocab_size: 256 (byte values).
        seq_len: tokens per training / evaluation window (the model's context).

    Args:
        text_dir: folder of text files to read instead of the stdlib (null: the stdlib).
        pattern: glob the files' paths (relative to the folder) must match.
        seq_len: window length.
        batch_size: windows per batch.
        num_workers: DataLoader workers.
        max_bytes: bytes read in all (files in the seeded order until this much).
        val_bytes: bytes of whole files held out for validation.
        test_bytes: bytes of whole files held out for the test.
        seed: seed of the file order.
    """

    vocab_size = 256

    def __init__(
        self,
        text_dir: str | None = None,
        pattern: str = "*.py",
        seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        max_bytes: int = 4_000_000,
        val_bytes: int = 200_000,
        test_bytes: int = 200_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("val_bytes", val_bytes, seq_len + 1)
        _check_int("test_bytes", test_bytes, seq_len + 1)
        _check_int("max_bytes", max_bytes, val_bytes + test_bytes + seq_len + 1)
        self.text_dir = Path(text_dir) if text_dir else None
        self.pattern, self.seq_len, self.batch_size = pattern, seq_len, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_bytes, self.val_bytes, self.test_bytes = max_bytes, val_bytes, test_bytes
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None
        self.test_set: TokenWindows | None = None

    @property
    def root(self) -> Path:
        return self.text_dir or stdlib_dir()

    def files(self) -> list[Path]:
        """The files read, in the seeded order."""
        root, files = self.root, []
        for folder, dirs, names in os.walk(root):
            # Pruned while walking: the stdlib folder holds site-packages (torch and all).
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            rel = Path(folder).relative_to(root)
            files += [root / rel / n for n in names if (rel / n).match(self.pattern)]
        files.sort()
        random.Random(self.seed).shuffle(files)
        return files

    def check(self) -> None:
        """Find the text files (raises ``FileNotFoundError`` naming the folder otherwise)."""
        if not self.root.is_dir() or not self.files():
            where = "text_dir" if self.text_dir else f"the stdlib of {sys.executable}"
            raise FileNotFoundError(
                f"no files matching {self.pattern!r} in {self.root} ({where}); set "
                "data.text_dir=<a folder of text files> (and data.pattern=...)"
            )

    def _read(self) -> tuple[bytes, bytes, bytes]:
        splits: list[bytearray] = [bytearray(), bytearray(), bytearray()]  # test, val, train
        limits = (self.test_bytes, self.val_bytes, self.max_bytes - self.val_bytes)
        i = 0
        for path in self.files():
            while i < 2 and len(splits[i]) >= limits[i]:
                i += 1
            if sum(map(len, splits)) >= self.max_bytes:
                break
            splits[i] += path.read_bytes() + b"\n"
        test, val, train = (bytes(s) for s in splits)
        return train[: limits[2]], val, test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check()
        train, val, test = self._read()
        as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
        self.train_set = TokenWindows(as_tensor(train), self.seq_len)
        self.val_set = TokenWindows(as_tensor(val), self.seq_len)
        self.test_set = TokenWindows(as_tensor(test), self.seq_len)

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)
